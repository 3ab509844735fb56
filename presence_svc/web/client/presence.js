// presence-svc browser client __PRESENCE_VERSION__: an ES module, no build step, no dependencies.
// import { PresenceClient } from "https://presence.example/client/presence.js";
// Protocol: README.md, "WebSocket", "Event reference" and "Big rooms"; usage: "Use it from your
// frontend".
import {
  Backoff,
  RESTART_JITTER_MS,
  Roster,
  SQUARE,
  SeqOrderer,
  TYPING_SEND_EVERY,
  TypingTracker,
  batchUnits,
  closeAction,
  diffRosters,
  httpBase,
  refreshDelay,
  signalMessage,
  socketBase,
  tokenExpiry,
} from "./presence-state.js";

export {
  Backoff,
  Roster,
  SeqOrderer,
  TypingTracker,
  closeAction,
  diffRosters,
  refreshDelay,
  signalMessage,
  tokenExpiry,
};

export const VERSION = "__PRESENCE_VERSION__";

const DEFAULTS = {
  heartbeatInterval: 10000, // below the node's PRESENCE_IDLE_AFTER (30 s by default)
  activityTimeout: 60000, // input older than this: the user is not active, heartbeats stop
  cursorThrottle: 75, // at most one cursor heartbeat per window; the latest wins
  stableAfter: 10000, // a connection up this long resets the backoff
  backoffBase: 500,
  backoffCap: 20000,
  join: false, // true: join at connect, without waiting for setCursor() or join()
  signalMaxBytes: 1024, // the node's PRESENCE_SIGNAL_MAX_BYTES: larger signal data is refused here
  signalRate: 10, // the node's PRESENCE_SIGNAL_RATE (a second): pointTo() sends at most this often
};
const ACTIVITY_EVENTS = ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "focus"];
const OPEN = 1;

/** An error the client reports: `code` as in closeAction() or the server's error codes. */
export class PresenceError extends Error {
  constructor(code, message, closeCode = null) {
    super(message || code);
    this.name = "PresenceError";
    this.code = code;
    this.closeCode = closeCode;
  }
}

export class PresenceClient {
  /**
   * @param {object} options url (a node's base URL, or a list tried in turn on reconnects),
   *   studyId, token or getToken, and the tuning of DEFAULTS.
   */
  constructor(options) {
    const { url, studyId, token, getToken } = options || {};
    if (!url || (Array.isArray(url) && url.length === 0)) throw new TypeError("url is required");
    if (!studyId) throw new TypeError("studyId is required");
    if (!token && !getToken) throw new TypeError("token or getToken is required");
    this.urls = Array.isArray(url) ? [...url] : [url];
    this.studyId = studyId;
    // An option given as undefined keeps its default.
    const given = Object.entries(options).filter(([, value]) => value !== undefined);
    this.options = { ...DEFAULTS, ...Object.fromEntries(given) };
    this.state = "closed";
    this.userId = null;
    this.connectionId = null;
    this.url = null; // the base URL of the node this client is on
    this.connects = 0; // sockets that reached "connected"
    this.resyncs = 0; // fresh snapshots asked for after a seq gap
    this._token = token || null;
    this._getToken = getToken || null;
    this._freshToken = false;
    this._WebSocket = this.options.WebSocket || globalThis.WebSocket;
    this._listeners = new Map();
    this._roster = new Roster();
    this._orderer = new SeqOrderer();
    this._backoff = new Backoff({ base: this.options.backoffBase, cap: this.options.backoffCap });
    this._urlIndex = 0;
    this._ws = null;
    this._opening = false;
    this._stopped = true;
    this._ready = null;
    this._timers = new Map();
    this._joined = false;
    this._cursor = {};
    this._lastActivity = Date.now();
    this._lastHeartbeat = 0;
    this._lastCursorSent = 0;
    this._domListeners = [];
    this._typing = new TypingTracker();
    this._pointers = new Map();
    this._lastTypingSent = -Infinity;
    this._pointer = null; // the latest pointTo() not yet sent
    this._lastPointerSent = -Infinity;
  }

  /** Subscribe to "change", "join", "leave", "status", "cursor", "state", "error", "resync",
   * "event" (messages other backends publish), "signal" (name, data, message), "signal.<name>"
   * (data, message), "typing" (typingUsers()) or "pointers" (pointers()); returns the
   * unsubscribe function. */
  on(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this._listeners.get(type)?.delete(listener);
  }

  /** One entry per listed user: {user_id, status, chapter_id, move_path, ...}; everyone unless
   * complete() is false (a big room), where a later event of another user lists them too. */
  users() {
    return this._roster.users();
  }

  /** Sessions by status, listed or not: {active, idle, away}, kept exact from the events. */
  counts() {
    return { ...this._roster.counts };
  }

  /** The number of sessions in the study (listed or not). */
  total() {
    return this._roster.total();
  }

  /** Whether users() lists everyone (false in a study larger than the node's snapshot). */
  complete() {
    return this._roster.complete;
  }

  /** Other users typing now: [{user_id, chapter_id}], each until 5 s after their last signal. */
  typingUsers() {
    return this._typing.users();
  }

  /** The latest pointer of each other user on the board: [{user_id, chapter_id, square,
   * move_path}]; a pointer that left the board (square null) or whose user left is gone. */
  pointers() {
    return [...this._pointers.values()].sort((a, b) => a.user_id.localeCompare(b.user_id));
  }

  /** Open the socket; resolves once the first snapshot is applied (rejects if stopped). */
  connect() {
    if (this._ready && !this._stopped) return this._ready.promise;
    this._stopped = false;
    let resolve;
    let reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    this._ready = { promise, resolve, reject, settled: false };
    this._listenToPage();
    this._beatTimer = setInterval(() => this._tick(), this.options.heartbeatInterval);
    this._setState("connecting");
    this._open();
    return promise;
  }

  /** Join (if not yet) and move this user's cursor; updates within the throttle: latest wins. */
  setCursor({ chapterId, movePath } = {}) {
    if (chapterId !== undefined) this._cursor.chapter_id = chapterId;
    if (movePath !== undefined) this._cursor.move_path = movePath;
    this._joined = true;
    this._lastActivity = Date.now();
    const wait = this._lastCursorSent + this.options.cursorThrottle - Date.now();
    if (wait <= 0 && !this._timers.has("cursor")) this._sendCursor();
    else if (!this._timers.has("cursor")) this._after("cursor", wait, () => this._sendCursor());
  }

  /** Be present in the study without a cursor (setCursor() joins too). */
  join() {
    this._joined = true;
    this._lastActivity = Date.now();
    this._heartbeat(true);
  }

  /**
   * Send a signal to the study's other sockets; false when not connected (signals are never
   * queued, a reconnect does not send them). TypeError or RangeError for a name, data or size
   * the node would refuse. It is not a heartbeat.
   */
  sendSignal(name, data = {}) {
    const text = signalMessage(name, data, this.options.signalMaxBytes);
    if (!this._ws || this._ws.readyState !== OPEN) return false;
    this._ws.send(text);
    return true;
  }

  /** Call on each keystroke: sends "typing" at most every 2 s (with the cursor's chapter). */
  typing() {
    if (Date.now() - this._lastTypingSent < TYPING_SEND_EVERY) return false;
    const data = this._cursor.chapter_id ? { chapter_id: this._cursor.chapter_id } : {};
    const sent = this.sendSignal("typing", data);
    if (sent) this._lastTypingSent = Date.now();
    return sent;
  }

  /** The user stopped typing (sent a message, left the field): others stop showing it now. */
  stopTyping() {
    if (!Number.isFinite(this._lastTypingSent)) return false;
    this._lastTypingSent = -Infinity;
    return this.sendSignal("typing", { active: false });
  }

  /** Where this user's pointer is on the board: {chapter_id, square ("e4", or null: off the
   * board), move_path?}; throttled to the signal rate, the latest wins. */
  pointTo({ chapter_id = null, square = null, move_path } = {}) {
    if (square !== null && !SQUARE.test(square)) throw new TypeError(`square must be a1..h8 or null: ${square}`);
    this._pointer = move_path === undefined ? { chapter_id, square } : { chapter_id, square, move_path };
    const wait = this._lastPointerSent + 1000 / this.options.signalRate - Date.now();
    if (this._timers.has("pointer")) return;
    if (wait <= 0) this._sendPointer();
    else this._after("pointer", wait, () => this._sendPointer());
  }

  /** End this user's session in the study at once (REST DELETE); the socket keeps watching. */
  async leave() {
    this._joined = false;
    this._clear("cursor");
    const token = await this._currentToken();
    const base = httpBase(this.url || this.urls[this._urlIndex % this.urls.length]);
    const response = await fetch(`${base}/presence/${encodeURIComponent(this.studyId)}`, {
      method: "DELETE",
      headers: { Authorization: `Bearer ${token}` },
    });
    if (!response.ok) throw new PresenceError("leave_failed", `leave: HTTP ${response.status}`);
  }

  /** Close the socket and stop for good (a later connect() starts again). */
  close() {
    this._stop(new PresenceError("closed", "the client was closed"));
  }

  // --- the socket ---------------------------------------------------------------------------

  async _open() {
    this._clear("reconnect");
    if (this._stopped || this._ws || this._opening) return;
    if (globalThis.navigator?.onLine === false) return; // the "online" event reconnects
    this._opening = true;
    let token;
    try {
      token = await this._currentToken();
    } catch (error) {
      this._opening = false;
      this._emit("error", new PresenceError("token", `getToken failed: ${error}`));
      this._retry(this._backoff.next());
      return;
    }
    this._opening = false;
    if (this._stopped || this._ws) return;
    const base = this.urls[this._urlIndex % this.urls.length];
    const query = `study_id=${encodeURIComponent(this.studyId)}&token=${encodeURIComponent(token)}`;
    const ws = new this._WebSocket(`${socketBase(base)}/ws/presence?${query}`);
    this._ws = ws;
    this.url = base;
    this._orderer.restart();
    ws.onmessage = (message) => this._ws === ws && this._onMessage(message.data);
    ws.onclose = (event) => this._ws === ws && this._onClose(event.code, event.reason);
    ws.onerror = () => {}; // a close event always follows
  }

  async _currentToken() {
    const expires = tokenExpiry(this._token);
    const stale = expires !== null && expires - Date.now() < 1000;
    if (this._getToken && (!this._token || stale || this._freshToken)) {
      this._token = await this._getToken();
      this._freshToken = false;
    }
    return this._token;
  }

  _onMessage(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    const { type, data } = message;
    if (type === "connected") this._onConnected(data);
    else if (type === "presence.snapshot") this._onSnapshot(data);
    else if (type === "presence.batch") this._onBatch(data || {});
    else if (typeof type === "string" && type.startsWith("presence.") && data?.seq !== undefined)
      this._onEvent(message);
    else if (type === "refreshed") this._scheduleRefresh();
    else if (type === "error") this._emit("error", new PresenceError(data?.code, data?.message));
    else if (type !== "pong") this._onOther(message);
  }

  /** A message without a seq: a signal, or an event another backend published. */
  _onOther(message) {
    const { type } = message;
    if (typeof type !== "string" || !type.startsWith("signal.") || type.length === 7) {
      this._emit("event", message);
      return;
    }
    const name = type.slice(7);
    const data = message.data || {};
    this._emit("signal", name, data, message);
    this._emit(type, data, message);
    // The built-in semantics are about other users (another tab of this user is not news).
    if (data.user_id === this.userId) return;
    if (name === "typing") {
      if (this._typing.signal(data, Date.now())) this._typingChanged();
      else this._armTyping(); // the same user again: their entry lasts longer
    } else if (name === "pointer") this._onPointer(data);
  }

  _onConnected(data) {
    this.userId = data.user_id;
    this.connectionId = data.connection_id;
    this.connects += 1;
    // Back within the leave grace, on any node: this heartbeat keeps the session, so watchers
    // see neither a leave nor a second join.
    if (this._joined) this._heartbeat(true);
    this._scheduleRefresh();
  }

  _onSnapshot(data) {
    const before = this._roster.byUser;
    this._roster.reset(data.users || [], data);
    const { apply, gap } = this._orderer.snapshot(data.seq ?? 0);
    const leaves = this._roster.complete;
    for (const change of diffRosters(before, this._roster.byUser, { leaves })) this._report(change);
    this._emit("change", this.users());
    for (const event of apply) this._apply(event);
    if (this._ready && !this._ready.settled) {
      this._ready.settled = true;
      this._ready.resolve(this);
    }
    this._setState("open");
    this._after("stable", this.options.stableAfter, () => this._backoff.reset());
    if (gap) this._resync(gap);
  }

  _onEvent(message) {
    const event = { type: message.type, data: message.data, seq: message.data.seq };
    const { apply, gap } = this._orderer.push(event);
    for (const each of apply) this._apply(each);
    if (gap) this._resync(gap);
  }

  /** A batch: its messages reported as if they had come one by one; "change" once for it. */
  _onBatch(data) {
    const units = batchUnits(data.events);
    const { apply, gap } = this._orderer.pushBatch(data.first_seq ?? null, data.last_seq ?? null, units);
    let changed = false;
    for (const unit of apply) {
      if (unit.message) this._onOther(unit.message);
      else {
        this._applyOne(unit);
        changed = true;
      }
    }
    if (changed) this._emit("change", this.users());
    if (gap) this._resync(gap);
  }

  _apply(event) {
    this._applyOne(event);
    this._emit("change", this.users());
  }

  _applyOne(event) {
    this._report(this._roster.apply(event.type, event.data));
    // A leave of a user a partial list did not show is no "leave", but it ends their signals.
    if (event.type === "presence.user_left") this._forget(event.data.user_id);
  }

  _report({ kind, user }) {
    if (kind === "leave") this._forget(user.user_id);
    if (["join", "leave", "status", "cursor"].includes(kind)) this._emit(kind, user);
  }

  // --- typing and pointers of others ------------------------------------------------------

  _forget(userId) {
    if (this._typing.remove(userId)) this._typingChanged();
    if (this._pointers.delete(userId)) this._emit("pointers", this.pointers());
  }

  _typingChanged() {
    this._armTyping();
    this._emit("typing", this.typingUsers());
  }

  _armTyping() {
    const next = this._typing.nextExpiry();
    if (next === null) this._clear("typing");
    else
      this._after("typing", Math.max(0, next - Date.now()), () => {
        if (this._typing.expire(Date.now())) this._typingChanged();
        else this._armTyping();
      });
  }

  _onPointer(data) {
    if (typeof data.user_id !== "string") return;
    const before = this._pointers.get(data.user_id);
    if (data.square === null || data.square === undefined) {
      if (before) this._pointers.delete(data.user_id);
    } else {
      const { user_id, chapter_id = null, square, move_path = null } = data;
      this._pointers.set(user_id, { user_id, chapter_id, square, move_path });
    }
    if (before || this._pointers.has(data.user_id)) this._emit("pointers", this.pointers());
  }

  _sendPointer() {
    this._clear("pointer");
    const pointer = this._pointer;
    this._pointer = null;
    // Not connected: dropped, as every signal is (the next pointTo() says where it is then).
    if (pointer && this.sendSignal("pointer", pointer)) this._lastPointerSent = Date.now();
  }

  /** A missed event: a fresh socket on the same node brings a fresh snapshot and what follows. */
  _resync(gap) {
    this.resyncs += 1;
    this._emit("resync", gap);
    this._drop(4000, "resync");
    this._open();
  }

  _onClose(code, reason) {
    this._ws = null;
    this._clear("stable");
    this._clear("refresh");
    if (this._stopped) return;
    const { action, error } = closeAction(code);
    if (action === "token" && !this._getToken) {
      this._stop(new PresenceError(error, reason || "token refused", code));
      return;
    }
    if (error) {
      const fatal = action === "stop";
      this._emit("error", Object.assign(new PresenceError(error, reason, code), { fatal }));
    }
    if (action === "stop") {
      this._stop(new PresenceError(error, reason, code));
      return;
    }
    if (action === "token") this._freshToken = true;
    this._urlIndex += 1; // with several URLs, the next attempt goes to another node
    const delay = action === "now" ? Math.random() * RESTART_JITTER_MS : this._backoff.next();
    this._retry(delay);
  }

  _retry(delay) {
    this._setState("reconnecting");
    this._after("reconnect", delay, () => this._open());
  }

  _drop(code, reason) {
    const ws = this._ws;
    this._ws = null;
    this._clear("stable");
    this._clear("refresh");
    if (ws) ws.close(code, reason);
  }

  _stop(error) {
    this._stopped = true;
    this._drop(1000, "closed");
    for (const name of [...this._timers.keys()]) this._clear(name);
    clearInterval(this._beatTimer);
    for (const [target, type, listener] of this._domListeners)
      target.removeEventListener(type, listener);
    this._domListeners = [];
    if (this._ready && !this._ready.settled) {
      this._ready.settled = true;
      this._ready.reject(error);
    }
    this._setState("closed");
  }

  // --- heartbeats, cursor, token refresh ----------------------------------------------------

  _send(message) {
    if (!this._ws || this._ws.readyState !== OPEN) return false;
    this._ws.send(JSON.stringify(message));
    return true;
  }

  _heartbeat(withCursor) {
    const message = withCursor ? { type: "heartbeat", ...this._cursor } : { type: "heartbeat" };
    if (this._send(message)) this._lastHeartbeat = Date.now();
  }

  _sendCursor() {
    this._clear("cursor");
    this._lastCursorSent = Date.now();
    if (this._joined) this._heartbeat(true);
  }

  _active() {
    const visible = globalThis.document?.visibilityState !== "hidden";
    return visible && Date.now() - this._lastActivity < this.options.activityTimeout;
  }

  _tick() {
    if (this._joined && this._active()) this._heartbeat(false);
  }

  _onActivity() {
    this._lastActivity = Date.now();
    // Back after a pause (hidden tab, no input): heartbeat now rather than at the next tick.
    const late = Date.now() - this._lastHeartbeat >= this.options.heartbeatInterval;
    if (this._joined && late && this._active()) this._heartbeat(false);
  }

  _scheduleRefresh() {
    const expires = tokenExpiry(this._token);
    if (!this._getToken || expires === null) return;
    this._after("refresh", refreshDelay(expires, Date.now()), async () => {
      try {
        this._token = await this._getToken();
      } catch (error) {
        this._emit("error", new PresenceError("token", `getToken failed: ${error}`));
        return;
      }
      this._send({ type: "refresh", token: this._token });
    });
  }

  _listenToPage() {
    const page = globalThis.window;
    if (!page?.addEventListener) return;
    const add = (target, type, listener) => {
      target.addEventListener(type, listener, { passive: true });
      this._domListeners.push([target, type, listener]);
    };
    const activity = () => this._onActivity();
    for (const type of ACTIVITY_EVENTS) add(page, type, activity);
    if (globalThis.document) add(globalThis.document, "visibilitychange", activity);
    add(page, "offline", () => {
      // The socket is likely dead but may take long to say so: drop it and wait for "online".
      this._drop(1000, "offline");
      if (!this._stopped) this._setState("reconnecting");
    });
    add(page, "online", () => {
      this._backoff.reset();
      this._open();
    });
  }

  // --- plumbing -----------------------------------------------------------------------------

  _after(name, delay, callback) {
    this._clear(name);
    this._timers.set(
      name,
      setTimeout(() => {
        this._timers.delete(name);
        callback();
      }, delay),
    );
  }

  _clear(name) {
    clearTimeout(this._timers.get(name));
    this._timers.delete(name);
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
  }

  _emit(type, ...details) {
    for (const listener of this._listeners.get(type) || []) {
      try {
        listener(...details);
      } catch (error) {
        // A failing listener must not break the client; report it where pages look.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}
