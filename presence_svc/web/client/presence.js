// presence-svc browser client __PRESENCE_VERSION__: an ES module, no build step, no dependencies.
// import { PresenceClient } from "https://presence.example/client/presence.js";
// Protocol: README.md, "WebSocket" and "Event reference"; usage: "Use it from your frontend".
import {
  Backoff,
  RESTART_JITTER_MS,
  Roster,
  SeqOrderer,
  closeAction,
  diffRosters,
  httpBase,
  refreshDelay,
  socketBase,
  tokenExpiry,
} from "./presence-state.js";

export { Backoff, Roster, SeqOrderer, closeAction, diffRosters, refreshDelay, tokenExpiry };

export const VERSION = "__PRESENCE_VERSION__";

const DEFAULTS = {
  heartbeatInterval: 10000, // below the node's PRESENCE_IDLE_AFTER (30 s by default)
  activityTimeout: 60000, // input older than this: the user is not active, heartbeats stop
  cursorThrottle: 75, // at most one cursor heartbeat per window; the latest wins
  stableAfter: 10000, // a connection up this long resets the backoff
  backoffBase: 500,
  backoffCap: 20000,
  join: false, // true: join at connect, without waiting for setCursor() or join()
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
  }

  /** Subscribe to "change", "join", "leave", "status", "cursor", "state", "error", "resync",
   * or "event" (messages other backends publish); returns the unsubscribe function. */
  on(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this._listeners.get(type)?.delete(listener);
  }

  /** One entry per present user: {user_id, status, chapter_id, move_path, ...}. */
  users() {
    return this._roster.users();
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
    else if (typeof type === "string" && type.startsWith("presence.") && data?.seq !== undefined)
      this._onEvent(message);
    else if (type === "refreshed") this._scheduleRefresh();
    else if (type === "error") this._emit("error", new PresenceError(data?.code, data?.message));
    else if (type !== "pong") this._emit("event", message);
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
    this._roster.reset(data.users || []);
    const { apply, gap } = this._orderer.snapshot(data.seq ?? 0);
    for (const change of diffRosters(before, this._roster.byUser)) this._report(change);
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

  _apply(event) {
    this._report(this._roster.apply(event.type, event.data));
    this._emit("change", this.users());
  }

  _report({ kind, user }) {
    if (["join", "leave", "status", "cursor"].includes(kind)) this._emit(kind, user);
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

  _emit(type, detail) {
    for (const listener of this._listeners.get(type) || []) {
      try {
        listener(detail);
      } catch (error) {
        // A failing listener must not break the client; report it where pages look.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}
