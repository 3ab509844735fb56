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

export interface PresenceEvents {
  change: PresenceUser[];
  join: PresenceUser;
  leave: PresenceUser;
  status: PresenceUser;
  cursor: PresenceUser;
  state: ClientState;
  error: PresenceError;
  resync: SeqGap;
  event: { type: string; data?: unknown; [field: string]: unknown };
}

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
  users(): PresenceUser[];
  on<K extends keyof PresenceEvents>(type: K, listener: (detail: PresenceEvents[K]) => void): () => void;
  off<K extends keyof PresenceEvents>(type: K, listener: (detail: PresenceEvents[K]) => void): void;
  setCursor(cursor: { chapterId?: string | null; movePath?: string | null }): void;
  join(): void;
  leave(): Promise<void>;
  close(): void;
}
