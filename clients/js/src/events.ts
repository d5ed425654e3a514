/** The typed values the client hands to the application (see the README). */

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type JSONObject = Record<string, any>;

export type ConnectionState = "connecting" | "connected" | "resuming" | "closed";

/** A change of connection state, given to `onState`. */
export interface StateChange {
  state: ConnectionState;
  /** The connection attempt this is about (1 for the first). */
  attempt: number;
  /** `resuming`: how long the client waits before the attempt, in ms. */
  delayMs: number;
  /** The close code that ended the last connection (null: dropped). */
  closeCode: number | null;
  /** A short word on why (`dropped`, `draining`, `server_busy`, `resumed`, ...). */
  reason: string;
  /** `closed` after giving up: the error `events()` throws. */
  error: Error | null;
}

/** A credential from a token provider, with when it expires (unix seconds). */
export interface ClientSecret {
  value: string;
  expiresAt?: number | null;
}

/** A function call the model made. */
export interface ToolCall {
  callId: string;
  name: string;
  arguments: string;
}

/** A finished response: its `response.done`, and how its stream went. */
export interface Response {
  id: string;
  status: string;
  /** The text the client received for it, deltas joined in order. */
  text: string;
  toolCalls: ToolCall[];
  /** The connection was lost while it streamed and the client resumed it: nothing lost. */
  resumed: boolean;
  /** The server could not finish it after a loss. */
  interrupted: boolean;
  /** The error code of a `failed` response. */
  errorCode: string | null;
  /** The `response` object of `response.done`. */
  data: JSONObject;
}

/** One server event, delivered exactly once and in the order sent. */
export interface ServerEvent {
  type: string;
  /** The server's id ("" for the few events not in the session's log). */
  eventId: string;
  /** The event as the server sent it (the OpenAI Realtime shape). */
  data: JSONObject;
  /** The text of a `*.delta` event ("" for others). */
  delta: string;
  /** For `response.done`: the finished response. */
  response: Response | null;
}
