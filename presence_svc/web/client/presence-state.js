// presence-svc browser client __PRESENCE_VERSION__: the pure parts (no socket, no timers, no DOM).
// Roster state from a snapshot plus events, strict seq ordering, reconnect backoff, what to do
// on each close code, token expiry. tests/web/client/*.test.mjs import this module directly.

/** Events that change one user's status (the "status" event of the client). */
const STATUS_EVENTS = {
  "presence.user_active": "active",
  "presence.user_idle": "idle",
  "presence.user_away": "away",
};

function entryOf(data, previous) {
  const entry = { ...(previous || {}), ...data };
  delete entry.seq;
  delete entry.timestamp;
  // Events carry the time of the change; a listing carries last_heartbeat and joined_at.
  if (data.timestamp !== undefined) {
    if (data.status === "active" || !previous) entry.last_heartbeat = data.timestamp;
    if (!previous) entry.joined_at = entry.joined_at || data.timestamp;
  }
  return entry;
}

/**
 * Who is present, keyed by user id: built from a snapshot, then changed by each event.
 * apply() returns what the event meant ({kind, user, previous}) so the client can emit it.
 */
export class Roster {
  constructor() {
    this.byUser = new Map();
  }

  reset(users) {
    this.byUser = new Map(users.map((user) => [user.user_id, { ...user }]));
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
    if (type === "presence.user_left") {
      this.byUser.delete(data.user_id);
      // A leave of someone not here (a snapshot that already had it) changes nothing.
      return { kind: previous ? "leave" : "none", user: entryOf(data, previous), previous };
    }
    const user = entryOf(data, previous);
    this.byUser.set(data.user_id, user);
    // A join already in the snapshot (a burst of joins while it was read) is not a second join.
    if (!previous) return { kind: "join", user, previous };
    if (type === "presence.cursor_moved") return { kind: "cursor", user, previous };
    if (STATUS_EVENTS[type]) return { kind: "status", user, previous };
    return { kind: "update", user, previous };
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
 * push() and snapshot() return {apply: [events in order], gap: null | {expected, got}}.
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
    const held = this.held.sort((a, b) => a.seq - b.seq);
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

  _run(events) {
    const apply = [];
    for (const event of events) {
      if (event.seq <= this.seq) continue;
      if (event.seq !== this.seq + 1) return { apply, gap: { expected: this.seq + 1, got: event.seq } };
      this.seq = event.seq;
      apply.push(event);
    }
    return { apply, gap: null };
  }
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
export function diffRosters(before, after) {
  const changes = [];
  for (const [userId, user] of after) {
    const previous = before.get(userId);
    if (!previous) changes.push({ kind: "join", user, previous });
    else if (previous.status !== user.status) changes.push({ kind: "status", user, previous });
    else if (previous.chapter_id !== user.chapter_id || previous.move_path !== user.move_path)
      changes.push({ kind: "cursor", user, previous });
  }
  for (const [userId, previous] of before) {
    if (!after.has(userId)) changes.push({ kind: "leave", user: previous, previous });
  }
  return changes;
}
