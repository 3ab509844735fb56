// Types of the presence-svc browser client __PRESENCE_VERSION__ (presence.js beside this file).

export declare const VERSION: string;

export type PresenceStatus = "active" | "idle" | "away";
export type ClientState = "connecting" | "open" | "reconnecting" | "closed";

/** One present user, as the REST listing and the snapshot give it. */
export interface PresenceUser {
  session_id: string;
  user_id: string;
  study_id: string;
  chapter_id: string | null;
  move_path: string | null;
  status: PresenceStatus;
  last_heartbeat: string;
  joined_at: string;
  [field: string]: unknown;
}

export interface PresenceClientOptions {
  /** Base URL of any node (http, https, ws or wss), or several tried in turn on reconnects. */
  url: string | string[];
  studyId: string;
  /** A JWT; or getToken, called again on 4401 and before the token expires. */
  token?: string;
  getToken?: () => Promise<string> | string;
  /** ms between heartbeats while the user is active; keep it below PRESENCE_IDLE_AFTER. */
  heartbeatInterval?: number;
  /** ms after the last input during which the user counts as active. */
  activityTimeout?: number;
  /** ms: at most one cursor heartbeat per window, the latest cursor wins. */
  cursorThrottle?: number;
  /** ms a connection must stay up before the reconnect backoff starts over. */
  stableAfter?: number;
  backoffBase?: number;
  backoffCap?: number;
  /** Join at connect (default: join at the first setCursor() or join()). */
  join?: boolean;
  /** The node's PRESENCE_SIGNAL_MAX_BYTES (1024): larger signal data throws a RangeError. */
  signalMaxBytes?: number;
  /** The node's PRESENCE_SIGNAL_RATE (10 a second): pointTo() sends at most this often. */
  signalRate?: number;
  /** A WebSocket constructor (tests); the browser's by default. */
  WebSocket?: unknown;
}

export declare class PresenceError extends Error {
  code: string;
  closeCode: number | null;
  fatal?: boolean;
}

export interface SeqGap {
  expected: number;
  got: number;
}

/** Sessions by status, listed or not (a big room's snapshot lists only some users). */
export interface PresenceCounts {
  active: number;
  idle: number;
  away: number;
}

/** A signal as received: the sender's data plus its user id (from the sender's token). */
export type SignalData = { user_id: string; [field: string]: unknown };

/** A received message, as the node sent it. */
export interface PresenceMessage {
  type: string;
  data?: unknown;
  [field: string]: unknown;
}

/** Documented semantics of the "typing" signal: typing for the next few seconds. */
export interface TypingData {
  chapter_id?: string | null;
  /** false: the user stopped typing (ends it at once). */
  active?: boolean;
}

/** Documented semantics of the "pointer" signal: where the user hovers on the board. */
export interface PointerData {
  chapter_id: string | null;
  /** "a1".."h8", or null: the pointer left the board. */
  square: string | null;
  move_path?: string;
}

export interface TypingUser {
  user_id: string;
  chapter_id: string | null;
}

export interface Pointer {
  user_id: string;
  chapter_id: string | null;
  square: string;
  move_path: string | null;
}

/** The one argument of each listener of on(). */
export interface PresenceEvents {
  /** After a snapshot, an event, or a whole batch. */
  change: PresenceUser[];
  join: PresenceUser;
  leave: PresenceUser;
  status: PresenceUser;
  cursor: PresenceUser;
  state: ClientState;
  error: PresenceError;
  resync: SeqGap;
  event: PresenceMessage;
  /** The typing users changed (a signal came, ended, or expired 5 s after the last one). */
  typing: TypingUser[];
  /** Another user's pointer moved, left the board, or its user left. */
  pointers: Pointer[];
}

/** on("signal", (name, data, message) => ...): every signal of other sockets. */
export type SignalListener = (name: string, data: SignalData, message: PresenceMessage) => void;
/** on("signal.<name>", (data, message) => ...): the signals of one name. */
export type SignalEvent = `signal.${string}`;
export type NamedSignalListener = (data: SignalData, message: PresenceMessage) => void;

export declare class PresenceClient {
  constructor(options: PresenceClientOptions);
  readonly state: ClientState;
  readonly studyId: string;
  readonly userId: string | null;
  readonly connectionId: string | null;
  /** The base URL of the node the client is on. */
  readonly url: string | null;
  readonly connects: number;
  readonly resyncs: number;
  connect(): Promise<PresenceClient>;
  /** The users listed: everyone unless complete() is false (a big room). */
  users(): PresenceUser[];
  counts(): PresenceCounts;
  /** Sessions in the study, listed or not. */
  total(): number;
  /** Whether users() lists everyone. */
  complete(): boolean;
  /** Other users typing now, each until 5 s after their last typing signal. */
  typingUsers(): TypingUser[];
  /** The latest pointer on the board of each other user. */
  pointers(): Pointer[];
  on<K extends keyof PresenceEvents>(type: K, listener: (detail: PresenceEvents[K]) => void): () => void;
  on(type: "signal", listener: SignalListener): () => void;
  on(type: SignalEvent, listener: NamedSignalListener): () => void;
  off<K extends keyof PresenceEvents>(type: K, listener: (detail: PresenceEvents[K]) => void): void;
  off(type: "signal", listener: SignalListener): void;
  off(type: SignalEvent, listener: NamedSignalListener): void;
  /**
   * A signal to the study's other sockets; false when not connected (never queued). Throws
   * TypeError (name not ^[a-z][a-z0-9_]{0,31}$, data not an object) or RangeError (data over
   * signalMaxBytes of JSON).
   */
  sendSignal(name: string, data?: Record<string, unknown>): boolean;
  /** Call on each keystroke: a "typing" signal at most every 2 s; true when one was sent. */
  typing(): boolean;
  /** Ends this user's typing for the others at once ({"active": false}). */
  stopTyping(): boolean;
  /** This user's pointer on the board; throttled to signalRate, the latest wins. */
  pointTo(pointer: PointerData): void;
  setCursor(cursor: { chapterId?: string | null; movePath?: string | null }): void;
  join(): void;
  leave(): Promise<void>;
  close(): void;
}
