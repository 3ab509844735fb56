// presence-svc browser client __PRESENCE_VERSION__: the pure parts (no socket, no timers, no DOM).
// Roster state from a snapshot plus events (with a big room's counts), strict seq ordering and
// batches, reconnect backoff, what to do on each close code, token expiry, signals and the
// typing users. tests/web/client/*.test.mjs import this module directly.

/** Events that change one user's status (the "status" event of the client). */
const STATUS_EVENTS = {
  "presence.user_active": "active",
  "presence.user_idle": "idle",
  "presence.user_away": "away",
};

const USER_JOINED = "presence.user_joined";
const USER_LEFT = "presence.user_left";
const CURSOR_MOVED = "presence.cursor_moved";
export const STATUSES = ["active", "idle", "away"];

function entryOf(data, previous, joined) {
  const entry = { ...(previous || {}), ...data };
  delete entry.seq;
  delete entry.timestamp;
  // A property of the event (what the status changed from), not of the user.
  delete entry.previous_status;
  // Events carry the time of the change; a listing carries last_heartbeat and joined_at.
  if (data.timestamp !== undefined) {
    if (data.status === "active" || (joined && !previous)) entry.last_heartbeat = data.timestamp;
    // An unlisted user's first event (a partial list) says nothing of when they joined.
    if (joined && !previous) entry.joined_at = entry.joined_at || data.timestamp;
  }
  return entry;
}

function countsOf(users) {
  const counts = Object.fromEntries(STATUSES.map((status) => [status, 0]));
  for (const user of users) counts[user.status] = (counts[user.status] || 0) + 1;
  return counts;
}

/**
 * Who is present, keyed by user id: built from a snapshot, then changed by each event.
 * apply() returns what the event meant ({kind, user, previous}) so the client can emit it.
 *
 * In a big room the snapshot lists only some users (`complete` false) while `counts` covers
 * every session: apply() keeps the counts exact from each event (its previous_status), and
 * an event of an unlisted user other than a join or leave lists them from then on.
 */
export class Roster {
  constructor() {
    this.byUser = new Map();
    this.counts = countsOf([]);
    this.complete = true;
  }

  /** From a snapshot's users and, from a server that sends them, its counts and complete. */
  reset(users, { counts, complete } = {}) {
    this.byUser = new Map(users.map((user) => [user.user_id, { ...user }]));
    this.complete = complete !== false;
    this.counts = counts ? { ...countsOf([]), ...counts } : countsOf(users);
  }

  /** Sessions in the study, listed or not. */
  total() {
    return Object.values(this.counts).reduce((sum, count) => sum + count, 0);
  }

  /** One entry per present user, the earliest joined first. */
  users() {
    return [...this.byUser.values()].sort(
      (a, b) =>
        String(a.joined_at).localeCompare(String(b.joined_at)) ||
        a.user_id.localeCompare(b.user_id),
    );
  }

  apply(type, data) {
    const previous = this.byUser.get(data.user_id);
    if (type === USER_LEFT) {
      this.byUser.delete(data.user_id);
      if (previous) this._add(previous.status, -1);
      else if (!this.complete) this._add(data.status, -1);
      // A leave of someone not here (a snapshot that already had it) changes nothing.
      return { kind: previous ? "leave" : "none", user: entryOf(data, previous, false), previous };
    }
    const user = entryOf(data, previous, type === USER_JOINED);
    this._count(type, previous, user.status, data.previous_status);
    this.byUser.set(data.user_id, user);
    if (!previous && type === USER_JOINED) return { kind: "join", user, previous };
    // A join already in the snapshot (a burst of joins while it was read) is not a second join,
    // and the first event of someone a partial list did not show lists them, without a join.
    if (type === CURSOR_MOVED) return { kind: "cursor", user, previous };
    if (STATUS_EVENTS[type]) return { kind: "status", user, previous };
    return { kind: "update", user, previous };
  }

  // The protocol's rule (joined: active + 1; left: its status - 1; a status change:
  // previous_status - 1, status + 1), except where a listed user shows that the snapshot
  // already counted the event (it may reflect a few events above its seq).
  _count(type, previous, status, previousStatus) {
    if (previous) {
      if (previous.status !== status) {
        this._add(previous.status, -1);
        this._add(status, 1);
      }
    } else if (type === USER_JOINED || this.complete) {
      this._add(status, 1); // everyone was listed, so an unlisted user was not counted either
    } else if (STATUS_EVENTS[type] && previousStatus) {
      this._add(previousStatus, -1);
      this._add(status, 1);
    }
  }

  _add(status, delta) {
    if (typeof status !== "string") return;
    this.counts[status] = Math.max(0, (this.counts[status] || 0) + delta);
  }
}

/**
 * Strict seq ordering of one socket's events.
 *
 * Before a snapshot, events are held. A snapshot sets the floor: held events at or below its
 * seq are dropped (already in it), the rest must follow it without a hole. After that, an event
 * at or below the last seq is a duplicate (dropped), the next seq is applied, and anything
 * further is a gap: the caller must re-sync (a fresh snapshot) instead of guessing.
 *
 * A batch (pushBatch) follows the protocol's rule instead: with everything up to first_seq - 1
 * applied, its events are applied in order, skipping those at or below the last seq applied,
 * and the stream continues from last_seq (seqs inside a batch are not contiguous). Its messages
 * without a seq (signals, other backends' events) are always returned, in their place.
 *
 * push(), pushBatch() and snapshot() return {apply: [events in order], gap: null | {expected, got}}.
 */
export class SeqOrderer {
  constructor() {
    this.seq = null;
    this.held = [];
  }

  /** Forget the stream (a new socket): hold events until its snapshot. */
  restart() {
    this.seq = null;
    this.held = [];
  }

  snapshot(seq) {
    this.seq = seq;
    const start = (unit) => (unit.batch ? unit.first : unit.seq);
    const held = this.held.sort((a, b) => start(a) - start(b));
    this.held = [];
    return this._run(held);
  }

  push(event) {
    if (this.seq === null) {
      this.held.push(event);
      return { apply: [], gap: null };
    }
    return this._run([event]);
  }

  /** One presence.batch: `events` in order, those of presence with their seq (see batchUnits). */
  pushBatch(first, last, events) {
    const others = events.filter((event) => event.seq === undefined);
    if (this.seq === null) {
      // Signals do not wait for the snapshot: no presence state depends on them.
      const ordered = events.filter((event) => event.seq !== undefined);
      if (first !== null) this.held.push({ batch: true, first, last, events: ordered });
      return { apply: others, gap: null };
    }
    const result = this._runBatch({ batch: true, first, last, events });
    return result.gap ? { apply: others, gap: result.gap } : result;
  }

  _run(units) {
    const apply = [];
    for (const unit of units) {
      if (unit.batch) {
        const result = this._runBatch(unit);
        if (result.gap) return { apply, gap: result.gap };
        apply.push(...result.apply);
        continue;
      }
      if (unit.seq <= this.seq) continue;
      if (unit.seq !== this.seq + 1) return { apply, gap: { expected: this.seq + 1, got: unit.seq } };
      this.seq = unit.seq;
      apply.push(unit);
    }
    return { apply, gap: null };
  }

  _runBatch({ first, last, events }) {
    if (first !== null && first > this.seq + 1) return { apply: [], gap: { expected: this.seq + 1, got: first } };
    const apply = [];
    for (const event of events) {
      if (event.seq === undefined) apply.push(event);
      else if (event.seq > this.seq) {
        this.seq = event.seq;
        apply.push(event);
      }
    }
    if (last !== null) this.seq = Math.max(this.seq, last);
    return { apply, gap: null };
  }
}

/**
 * The messages of a presence.batch as the orderer takes them: presence events as
 * {type, data, seq}, anything else (signals, other backends' events) as {message}.
 */
export function batchUnits(events) {
  return (Array.isArray(events) ? events : []).map((message) =>
    typeof message?.type === "string" && message.type.startsWith("presence.") && message.data?.seq !== undefined
      ? { type: message.type, data: message.data, seq: message.data.seq }
      : { message },
  );
}

/**
 * Capped exponential backoff with full jitter: attempt n waits a random time in
 * [0, min(cap, base * 2^n)). The caller resets it only once a connection has stayed up a while,
 * so a node that accepts then drops sockets at once cannot make every client hammer it.
 */
export class Backoff {
  constructor({ base = 500, cap = 20000, random = Math.random } = {}) {
    this.base = base;
    this.cap = cap;
    this.random = random;
    this.attempt = 0;
  }

  bound() {
    return Math.min(this.cap, this.base * 2 ** this.attempt);
  }

  next() {
    const delay = this.random() * this.bound();
    this.attempt += 1;
    return delay;
  }

  reset() {
    this.attempt = 0;
  }
}

/** Longest random wait before reconnecting after 1012 (a node shutting down). */
export const RESTART_JITTER_MS = 1000;

/**
 * What to do when the socket closes with `code` (README, "Close codes"):
 * "now" (reconnect after a small jitter), "token" (get a fresh token, then reconnect),
 * "stop" (do not reconnect; emit error) or "backoff" (reconnect after the backoff delay).
 */
export function closeAction(code) {
  switch (code) {
    case 1012: // the node is shutting down: another one takes us at once
      return { action: "now", error: null };
    case 4401: // bad or expired token
      return { action: "token", error: "unauthorized" };
    case 4400: // invalid study_id: the same request can never succeed
      return { action: "stop", error: "bad_request" };
    case 4403: // origin not allowed, or no grant for the study
      return { action: "stop", error: "forbidden" };
    case 1008: // we sent messages too fast
      return { action: "backoff", error: "rate_limited" };
    case 1013: // we read too slowly (or the node is overloaded)
      return { action: "backoff", error: "slow_consumer" };
    case 1007: // we sent invalid UTF-8: a bug on this side, reported
      return { action: "backoff", error: "invalid_utf8" };
    case 1009: // we sent a message over the size limit: a bug on this side, reported
      return { action: "backoff", error: "message_too_big" };
    case 4429: // too many sockets of this user on that node
      return { action: "backoff", error: "too_many_sockets" };
    case 1011: // the node could not subscribe or read the study
      return { action: "backoff", error: "server_error" };
    default: // 1000, 1001, 1006 (connection lost) and anything unknown
      return { action: "backoff", error: null };
  }
}

/** The `exp` claim of a JWT in milliseconds, or null when it has none or is not a JWT. */
export function tokenExpiry(token) {
  const part = typeof token === "string" ? token.split(".")[1] : undefined;
  if (!part) return null;
  try {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const claims = JSON.parse(atob(padded));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

/**
 * How long to wait before refreshing a token that expires at `expiresAt` (ms): a quarter of
 * its remaining life before expiry, at most 60 s and at least 1 s before it (0 when that is
 * already past), so slow token endpoints and small clock differences still leave time.
 */
export function refreshDelay(expiresAt, now) {
  const remaining = expiresAt - now;
  const margin = Math.min(60000, Math.max(1000, remaining / 4));
  return Math.max(0, remaining - margin);
}

/** ws(s)://host/prefix from a base URL given as http(s):// or ws(s)://, without a trailing slash. */
export function socketBase(url) {
  const trimmed = String(url).replace(/\/+$/, "");
  if (/^https:/i.test(trimmed)) return "wss:" + trimmed.slice(6);
  if (/^http:/i.test(trimmed)) return "ws:" + trimmed.slice(5);
  return trimmed;
}

/** http(s)://host/prefix from a base URL given as http(s):// or ws(s)://. */
export function httpBase(url) {
  const trimmed = String(url).replace(/\/+$/, "");
  if (/^wss:/i.test(trimmed)) return "https:" + trimmed.slice(4);
  if (/^ws:/i.test(trimmed)) return "http:" + trimmed.slice(3);
  return trimmed;
}

/**
 * What a fresh snapshot changed for someone who had `before` (a Map user id -> entry): the
 * joins, leaves, status changes and cursor moves it implies, so a re-sync is reported like the
 * events it stands for.
 */
export function diffRosters(before, after, { leaves = true } = {}) {
  const changes = [];
  for (const [userId, user] of after) {
    const previous = before.get(userId);
    if (!previous) changes.push({ kind: "join", user, previous });
    else if (previous.status !== user.status) changes.push({ kind: "status", user, previous });
    else if (previous.chapter_id !== user.chapter_id || previous.move_path !== user.move_path)
      changes.push({ kind: "cursor", user, previous });
  }
  // A partial list (a big room's snapshot) says nothing of whoever it leaves out: no leave.
  for (const [userId, previous] of before) {
    if (leaves && !after.has(userId)) changes.push({ kind: "leave", user: previous, previous });
  }
  return changes;
}

// --- signals ---------------------------------------------------------------------------------

export const SIGNAL_NAME = /^[a-z][a-z0-9_]{0,31}$/;
export const SQUARE = /^[a-h][1-8]$/;
export const TYPING_SEND_EVERY = 2000; // ms: a typing user sends at most this often
export const TYPING_EXPIRES_AFTER = 5000; // ms after their last typing signal

/**
 * The text of a signal message, checked as the server checks it: TypeError for a name outside
 * the grammar or data that is not a plain object, RangeError for data over `maxBytes` bytes of
 * compact JSON (UTF-8: what the node measures against PRESENCE_SIGNAL_MAX_BYTES).
 */
export function signalMessage(name, data, maxBytes) {
  if (typeof name !== "string" || !SIGNAL_NAME.test(name))
    throw new TypeError(`signal name must match ${SIGNAL_NAME}: ${JSON.stringify(name)}`);
  const payload = data === undefined ? {} : data;
  if (payload === null || typeof payload !== "object" || Array.isArray(payload))
    throw new TypeError("signal data must be a plain object");
  const json = JSON.stringify(payload);
  const size = new TextEncoder().encode(json).length;
  if (size > maxBytes) throw new RangeError(`signal data is ${size} bytes of JSON; at most ${maxBytes} are allowed`);
  return `{"type":"signal","name":${JSON.stringify(name)},"data":${json}}`;
}

/**
 * Who is typing (README, "Signals": a typing signal means "for the next few seconds"): each
 * user's entry lasts `expiresAfter` ms after their last typing signal, and `{"active": false}`
 * ends it at once. Every method takes the time, so the client owns the one timer.
 */
export class TypingTracker {
  constructor(expiresAfter = TYPING_EXPIRES_AFTER) {
    this.expiresAfter = expiresAfter;
    this.byUser = new Map();
  }

  /** A typing signal's data (with its user_id) at `now`; true if the typing users changed. */
  signal(data, now) {
    const userId = data?.user_id;
    if (typeof userId !== "string") return false;
    if (data.active === false) return this.byUser.delete(userId);
    const before = this.byUser.get(userId);
    const chapterId = data.chapter_id ?? null;
    this.byUser.set(userId, { user_id: userId, chapter_id: chapterId, until: now + this.expiresAfter });
    return !before || before.chapter_id !== chapterId;
  }

  /** Forget those whose time is up at `now`; true if anyone was. */
  expire(now) {
    let changed = false;
    for (const [userId, entry] of this.byUser) {
      if (entry.until <= now) changed = this.byUser.delete(userId) || changed;
    }
    return changed;
  }

  remove(userId) {
    return this.byUser.delete(userId);
  }

  /** When the next entry runs out (ms), or null when nobody is typing. */
  nextExpiry() {
    let next = null;
    for (const { until } of this.byUser.values()) if (next === null || until < next) next = until;
    return next;
  }

  /** [{user_id, chapter_id}] by user id. */
  users() {
    return [...this.byUser.values()]
      .map(({ user_id, chapter_id }) => ({ user_id, chapter_id }))
      .sort((a, b) => a.user_id.localeCompare(b.user_id));
  }
}
