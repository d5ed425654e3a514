/**
 * Switchboard's TypeScript client: Realtime conversations that resume by
 * themselves, in Node (20+) and in browsers. See README.md.
 */
export { Backoff, type BackoffOptions } from "./backoff.js";
export {
  RealtimeClient,
  TextStream,
  type ClientOptions,
  type SocketFactory,
  type SocketLike,
  type Tool,
} from "./client.js";
export {
  AuthenticationError,
  ClientClosed,
  GaveUp,
  PermissionDenied,
  QuotaExceeded,
  RequestFailed,
  ResumeUnavailable,
  SessionNotFound,
  SessionTakenOver,
  SwitchboardClientError,
  TerminalError,
  closeIsTerminal,
} from "./errors.js";
export type {
  ClientSecret,
  ConnectionState,
  JSONObject,
  Response,
  ServerEvent,
  StateChange,
  ToolCall,
} from "./events.js";
export { EventTracker } from "./tracker.js";
