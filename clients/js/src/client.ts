/**
 * `RealtimeClient`: a Switchboard Realtime connection that resumes by itself.
 *
 * The driver around `EventTracker` (tracker.ts): it opens the WebSocket, feeds
 * every frame to the tracker, and when the connection is lost (a dropped
 * socket, a drain's 1012, a resumable close code, a killed gateway) reconnects
 * with full-jitter backoff to the next URL and resumes the session with
 * `?session_id=...&last_event_id=...`. It stops only on a terminal refusal,
 * thrown from `events()`. The same concepts and names as the Python SDK.
 */
import { Backoff, type BackoffOptions } from "./backoff.js";
import {
  AuthenticationError,
  ClientClosed,
  GaveUp,
  INVALID_API_KEY_CLOSE,
  RequestFailed,
  closeIsTerminal,
  statusIsTerminal,
  terminalClose,
  terminalStatus,
} from "./errors.js";
import type {
  ClientSecret,
  ConnectionState,
  JSONObject,
  Response,
  ServerEvent,
  StateChange,
  ToolCall,
} from "./events.js";
import { EventTracker } from "./tracker.js";

/** A client-side tool: the model calls it, the client runs `handler` and answers. */
export interface Tool {
  name: string;
  /** Gets the call's arguments; its result is the output (JSON-encoded unless a string). */
  handler: (args: JSONObject) => Promise<unknown>;
  description?: string;
  parameters?: JSONObject;
}

/** What the client needs of a WebSocket: the browser's, or the `ws` package's. */
export interface SocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  terminate?(): void;
  ping?(): void;
  on?(event: string, listener: (...args: any[]) => void): unknown;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
}

export type SocketFactory = new (
  url: string,
  protocols?: string | string[],
  options?: { headers?: Record<string, string> },
) => SocketLike;

export interface ClientOptions {
  /** The gateway's WebSocket URL, or several (replicas): each reconnect tries the next. */
  url: string | string[];
  model?: string;
  /** A tenant key (servers only) or an `ek_` secret. */
  apiKey?: string;
  /** Instead of `apiKey`: returns an `ek_` secret; called again before it expires and when refused. */
  tokenProvider?: () => Promise<string | ClientSecret>;
  /** Client-side tools, declared with `session.update` when the session starts. */
  tools?: Tool[];
  instructions?: string;
  backoff?: Backoff | BackoffOptions;
  onState?: (change: StateChange) => void;
  /**
   * How the credential is sent: `header` (`Authorization: Bearer`, Node) or
   * `subprotocol` (`realtime` + `openai-insecure-api-key.<ek_>`, browsers, which
   * cannot set headers). Default: `subprotocol` when the WebSocket is the
   * browser's, else `header`.
   */
  auth?: "header" | "subprotocol";
  /** The WebSocket class (default: `globalThis.WebSocket`, else the `ws` package). */
  WebSocket?: SocketFactory;
  /** Node (`ws`) only: ping every so often; no pong in time counts as a lost connection. */
  pingIntervalMs?: number;
  openTimeoutMs?: number;
}

const EXPIRY_MARGIN_MS = 5_000;

class Retry extends Error {
  constructor(
    readonly reason: string,
    readonly afterMs: number | null = null,
  ) {
    super(reason);
  }
}

class Refused extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    readonly detail: string,
    readonly retryAfterMs: number | null,
  ) {
    super(`${status} ${code}`);
  }
}

/** A flag one can wait for. */
class Flag {
  private value = false;
  private waiters: Array<() => void> = [];
  get isSet(): boolean {
    return this.value;
  }
  set(): void {
    this.value = true;
    for (const wake of this.waiters.splice(0)) wake();
  }
  clear(): void {
    this.value = false;
  }
  wait(): Promise<void> {
    return this.value ? Promise.resolve() : new Promise((wake) => this.waiters.push(wake));
  }
}

/** The events waiting to be read, then the reason the stream ended. */
class EventQueue {
  private items: ServerEvent[] = [];
  private end: Error | null = null;
  private waiters: Array<() => void> = [];
  push(event: ServerEvent): void {
    this.items.push(event);
    this.wake();
  }
  finish(error: Error): void {
    this.end ??= error;
    this.wake();
  }
  async next(): Promise<ServerEvent | Error> {
    while (!this.items.length && !this.end) {
      await new Promise<void>((wake) => this.waiters.push(wake));
    }
    return this.items.shift() ?? (this.end as Error);
  }
  private wake(): void {
    for (const wake of this.waiters.splice(0)) wake();
  }
}

function randomHex(bytes: number): string {
  const values = new Uint8Array(bytes);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(values);
  else values.forEach((_, i) => (values[i] = Math.floor(Math.random() * 256)));
  return [...values].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export class RealtimeClient {
  readonly model: string;
  readonly backoff: Backoff;
  readonly tracker = new EventTracker();
  state: ConnectionState = "closed";
  /** How many connections were opened, and how many resumed the session. */
  connections = 0;
  resumes = 0;
  /** Why the client stopped by itself (what `events()` throws). */
  error: Error | null = null;
  /** The URL of the current (or last) connection: which replica serves it. */
  url: string | null = null;

  private readonly urls: string[];
  private readonly options: ClientOptions;
  private readonly tools: Map<string, Tool>;
  private credential: ClientSecret | null;
  private readonly prefix = randomHex(4);
  private eventCount = 0;
  private itemCount = 0;
  private readonly queue = new EventQueue();
  private readonly ready = new Flag();
  private readonly stopped = new Flag();
  private socket: SocketLike | null = null;
  private sentNow = new Set<string>();
  private runner: Promise<void> | null = null;
  private closing = false;
  private urlIndex = 0;
  private dropCurrent: (() => void) | null = null;

  constructor(options: ClientOptions) {
    if ((options.apiKey === undefined) === (options.tokenProvider === undefined)) {
      throw new TypeError("give exactly one of apiKey and tokenProvider");
    }
    this.options = options;
    this.urls = typeof options.url === "string" ? [options.url] : [...options.url];
    if (!this.urls.length) throw new TypeError("give at least one url");
    this.model = options.model ?? "gpt-realtime";
    this.credential = options.apiKey !== undefined ? { value: options.apiKey } : null;
    this.tools = new Map((options.tools ?? []).map((tool) => [tool.name, tool]));
    this.backoff =
      options.backoff instanceof Backoff ? options.backoff : new Backoff(options.backoff);
  }

  get sessionId(): string | null {
    return this.tracker.sessionId;
  }

  // --- lifecycle -------------------------------------------------------------------

  /** Open the first connection (retrying as the backoff allows); throws a terminal error. */
  async connect(): Promise<void> {
    if (this.runner) throw new Error("connect() was called already");
    this.runner = this.run().finally(() => this.stopped.set());
    await Promise.race([this.ready.wait(), this.stopped.wait()]);
    if (!this.ready.isSet) throw this.error ?? new ClientClosed("the client was closed");
    if (this.tools.size || this.options.instructions !== undefined) {
      await this.send(this.sessionUpdate());
    }
  }

  /** Close the connection; `events()` ends. Idempotent. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    this.socket?.close(1000, "closed");
    this.stopped.set();
    await this.runner;
    this.ready.clear();
    if (this.state !== "closed") this.setState({ state: "closed", reason: "closed" });
    this.queue.finish(new ClientClosed("the client was closed"));
  }

  /**
   * Cut the socket as a lost network would, for tests and demos of resuming:
   * the client reconnects and resumes as after any loss. (In a browser, which
   * cannot drop a socket abruptly, the socket is closed and abandoned at once.)
   */
  dropConnection(): void {
    this.dropCurrent?.();
  }

  // --- sending ---------------------------------------------------------------------

  /**
   * Send a client event (an `event_id` is added when it has none); waits while
   * the client reconnects. An event lost with a connection is sent again after
   * the resume (see the README). Returns the event's `event_id`.
   */
  async send(event: JSONObject): Promise<string> {
    const copy: JSONObject = { ...event };
    copy.event_id ??= `sbc_${this.prefix}_${++this.eventCount}`;
    const eventId = String(copy.event_id);
    this.tracker.sent(copy);
    await this.waitReady();
    if (this.sentNow.has(eventId)) return eventId; // the resume's resend sent it
    this.sentNow.add(eventId);
    this.transmit(this.socket, copy);
    return eventId;
  }

  /** Add a message; returns its item id (chosen by the client, so a resend is recognised). */
  async addText(text: string, role: "user" | "system" | "assistant" = "user"): Promise<string> {
    const itemId = `item_sbc${this.prefix}${++this.itemCount}`;
    const type = role === "assistant" ? "output_text" : "input_text";
    await this.send({
      type: "conversation.item.create",
      item: { id: itemId, type: "message", role, content: [{ type, text }] },
    });
    return itemId;
  }

  /** Ask for a response (optional `response` fields); returns the client event id. */
  async createResponse(fields?: JSONObject): Promise<string> {
    const event: JSONObject = { type: "response.create" };
    if (fields && Object.keys(fields).length) event.response = fields;
    return this.send(event);
  }

  /** Answer a function call (without asking for the next response). */
  async sendToolOutput(callId: string, output: string): Promise<string> {
    return this.send({
      type: "conversation.item.create",
      item: {
        id: `item_sbc${this.prefix}${++this.itemCount}`,
        type: "function_call_output",
        call_id: callId,
        output,
      },
    });
  }

  /** Cancel the running response. */
  async cancel(): Promise<string> {
    return this.send({ type: "response.cancel" });
  }

  // --- receiving -------------------------------------------------------------------

  /**
   * Every server event, exactly once and in order, across reconnects. Ends when
   * the client is closed; throws a `TerminalError` or `GaveUp` when it stopped.
   */
  async *events(): AsyncGenerator<ServerEvent, void, undefined> {
    for (;;) {
      const item = await this.queue.next();
      if (item instanceof ClientClosed) return;
      if (item instanceof Error) throw item;
      yield item;
    }
  }

  /** Send `text` (if given), ask for a response, and iterate its text; see `TextStream`. */
  streamText(text?: string, fields?: JSONObject): TextStream {
    return new TextStream(this, text, fields);
  }

  // --- the connection loop ---------------------------------------------------------

  private async run(): Promise<void> {
    let failures = 0;
    let closeCode: number | null = null;
    let reason = "";
    let suggested: number | null = null;
    try {
      for (;;) {
        if (this.closing) return;
        const resuming = this.tracker.sessionId !== null;
        if (failures || resuming) {
          if (this.backoff.exhausted(failures)) {
            throw new GaveUp(`no connection after ${failures} attempts (${reason})`, failures);
          }
          const delayMs = this.backoff.delay(failures, suggested);
          this.setState({
            state: resuming ? "resuming" : "connecting",
            attempt: failures + 1,
            delayMs,
            closeCode,
            reason: reason || "dropped",
          });
          await Promise.race([sleep(delayMs), this.stopped.wait()]);
          if (this.closing) return;
        } else {
          this.setState({ state: "connecting", attempt: 1 });
        }
        const url = this.urls[this.urlIndex % this.urls.length] as string;
        let socket: Opened;
        try {
          socket = await this.open(url, resuming);
        } catch (error) {
          if (!(error instanceof Retry)) throw error;
          failures += 1;
          reason = error.reason;
          suggested = error.afterMs;
          closeCode = null;
          this.urlIndex += 1;
          continue;
        }
        if (this.closing) {
          socket.socket.close(1000, "closed");
          return;
        }
        failures = 0;
        suggested = null;
        this.url = url;
        ({ closeCode, reason } = await this.serve(socket, resuming));
        this.tracker.connectionLost();
        if (this.closing) return;
        if (closeIsTerminal(closeCode)) {
          if (closeCode === INVALID_API_KEY_CLOSE && this.options.tokenProvider) {
            this.credential = null;
            continue;
          }
          throw terminalClose(closeCode as number, reason);
        }
        this.urlIndex += 1; // another replica: this one may be draining or dead
      }
    } catch (error) {
      const failure = error instanceof Error ? error : new Error(String(error));
      this.error = failure;
      this.setState({ state: "closed", reason: "gave up", error: failure });
      this.queue.finish(failure);
    }
  }

  private async open(url: string, resuming: boolean): Promise<Opened> {
    const query = new URLSearchParams({ model: this.model });
    if (resuming) {
      query.set("session_id", this.tracker.sessionId as string);
      if (this.tracker.lastEventId) query.set("last_event_id", this.tracker.lastEventId);
    }
    for (const refresh of [false, true]) {
      const credential = await this.credentialValue();
      try {
        return await this.attempt(`${url}?${query}`, credential);
      } catch (error) {
        if (error instanceof Refused) {
          if (error.status === 401 && this.options.tokenProvider && !refresh) {
            this.credential = null; // refused: the provider gives a fresh one
            continue;
          }
          if (statusIsTerminal(error.status)) {
            throw terminalStatus(error.status, error.code, error.detail);
          }
          throw new Retry(error.code || `http_${error.status}`, error.retryAfterMs);
        }
        if (error instanceof Retry && this.options.tokenProvider) {
          // A browser is not told why a handshake failed: it may be an expired secret.
          this.credential = null;
        }
        throw error;
      }
    }
    throw new AuthenticationError("refused twice", { code: "invalid_api_key", status: 401 });
  }

  private async socketClass(): Promise<SocketFactory> {
    if (this.options.WebSocket) return this.options.WebSocket;
    const native = (globalThis as { WebSocket?: SocketFactory }).WebSocket;
    if (native) return native;
    // Node has no WebSocket before 22: the `ws` package (a peer dependency). Its
    // name is a variable so that browser bundlers leave it alone.
    const name = "ws";
    const module = (await import(name)) as { WebSocket: SocketFactory };
    return module.WebSocket;
  }

  private async attempt(url: string, credential: string): Promise<Opened> {
    const Socket = await this.socketClass();
    const browser =
      Socket === (globalThis as { WebSocket?: unknown }).WebSocket &&
      typeof (globalThis as { window?: unknown }).window !== "undefined";
    const auth = this.options.auth ?? (browser ? "subprotocol" : "header");
    return new Promise<Opened>((resolve, reject) => {
      const socket =
        auth === "subprotocol"
          ? new Socket(url, ["realtime", `openai-insecure-api-key.${credential}`])
          : new Socket(url, undefined, { headers: { Authorization: `Bearer ${credential}` } });
      let settled = false;
      // Frames that arrive with the handshake's answer, before `serve` listens.
      const early: unknown[] = [];
      socket.onmessage = (message) => early.push(message.data);
      const settle = (error: Error | null): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.onopen = socket.onerror = socket.onclose = null;
        if (error) {
          abandon(socket);
          reject(error);
        } else {
          const opened: Opened = { socket, early, closed: null };
          socket.onclose = (event) => {
            opened.closed = event;
          };
          resolve(opened);
        }
      };
      const timer = setTimeout(() => settle(new Retry("timeout")), this.options.openTimeoutMs ?? 10_000);
      socket.on?.("unexpected-response", (_request: unknown, response: NodeResponse) => {
        const chunks: Uint8Array[] = [];
        response.on("data", (chunk: Uint8Array) => chunks.push(chunk));
        response.on("end", () => {
          const { code, message } = refusal(Buffer.concat(chunks).toString());
          const after = Number(response.headers["retry-after"]);
          settle(new Refused(response.statusCode, code, message, after > 0 ? after * 1000 : null));
        });
      });
      socket.on?.("error", () => settle(new Retry("unreachable")));
      socket.onopen = () => settle(null);
      socket.onerror = () => settle(new Retry("unreachable"));
      socket.onclose = () => settle(new Retry("unreachable"));
    });
  }

  private async credentialValue(): Promise<string> {
    let secret = this.credential;
    const expired =
      secret?.expiresAt != null && secret.expiresAt * 1000 - EXPIRY_MARGIN_MS <= Date.now();
    if (secret === null || (expired && this.options.tokenProvider)) {
      const given = await (this.options.tokenProvider as () => Promise<string | ClientSecret>)();
      secret = typeof given === "string" ? { value: given } : given;
      this.credential = secret;
    }
    return secret.value;
  }

  private serve(
    opened: Opened,
    resuming: boolean,
  ): Promise<{ closeCode: number | null; reason: string }> {
    const { socket, early } = opened;
    this.socket = socket;
    this.sentNow = new Set();
    this.connections += 1;
    if (resuming) this.resumes += 1;
    return new Promise((resolve) => {
      let done = false;
      let heartbeat: ReturnType<typeof setInterval> | undefined;
      const finish = (closeCode: number | null, reason: string): void => {
        if (done) return;
        done = true;
        clearInterval(heartbeat);
        socket.onmessage = socket.onclose = socket.onerror = null;
        this.socket = null;
        this.dropCurrent = null;
        this.ready.clear();
        resolve({ closeCode, reason });
      };
      this.dropCurrent = () => {
        abandon(socket);
        finish(null, "dropped");
      };
      // A new session is ready with its `session.created`; a resumed one at
      // once, or when the answer to a sync shows the replay is over.
      let waiting = true;
      if (resuming && this.tracker.unanswered().length) {
        this.transmit(socket, this.tracker.syncEvent());
      } else if (resuming) {
        waiting = false;
        this.connected(true);
      }
      const receive = (data: unknown): void => {
        const text = typeof data === "string" ? data : String(data);
        let raw: unknown;
        try {
          raw = JSON.parse(text);
        } catch {
          return;
        }
        if (!raw || typeof raw !== "object") return;
        const event = this.tracker.accept(raw as JSONObject);
        if (
          waiting &&
          ((resuming && this.tracker.synced) ||
            (!resuming && event !== null && event.type === "session.created"))
        ) {
          waiting = false;
          // What the server has not answered never reached it: send it again.
          for (const pending of this.tracker.unanswered()) {
            this.sentNow.add(String(pending.event_id));
            this.transmit(socket, pending);
          }
          this.connected(resuming);
        }
        if (event) this.deliver(event);
      };
      const onClose = (event: { code: number; reason: string }): void => {
        const dropped = event.code === 1006 || event.code === 1005;
        finish(dropped ? null : event.code, dropped ? "dropped" : event.reason);
      };
      for (const data of early.splice(0)) receive(data);
      socket.onmessage = (message) => receive(message.data);
      if (opened.closed) onClose(opened.closed);
      socket.onclose = onClose;
      socket.onerror = () => undefined; // a close follows
      if (socket.ping && socket.on) {
        // Node: a connection whose pong does not come back in time is lost.
        let answered = true;
        socket.on("pong", () => {
          answered = true;
        });
        heartbeat = setInterval(() => {
          if (!answered) {
            this.dropCurrent?.();
            return;
          }
          answered = false;
          socket.ping?.();
        }, this.options.pingIntervalMs ?? 10_000);
      }
    });
  }

  private transmit(socket: SocketLike | null, event: JSONObject): void {
    if (socket === null || socket.readyState !== 1) return; // resent after the resume
    try {
      socket.send(JSON.stringify(event));
    } catch {
      // the connection is going: the event is resent after the resume if unanswered
    }
  }

  private connected(resumed: boolean): void {
    this.ready.set();
    this.setState({ state: "connected", reason: resumed ? "resumed" : "new" });
  }

  private sessionUpdate(): JSONObject {
    const session: JSONObject = { type: "realtime" };
    if (this.tools.size) {
      session.tools = [...this.tools.values()].map((tool) => ({
        type: "function",
        name: tool.name,
        description: tool.description ?? "",
        parameters: tool.parameters ?? { type: "object", properties: {} },
      }));
    }
    if (this.options.instructions !== undefined) session.instructions = this.options.instructions;
    return { type: "session.update", session };
  }

  private async waitReady(): Promise<void> {
    if (this.closing) throw new ClientClosed("the client was closed");
    if (this.ready.isSet) return;
    if (!this.runner) throw new Error("connect() first");
    await Promise.race([this.ready.wait(), this.stopped.wait()]);
    if (!this.ready.isSet) throw new ClientClosed("the client stopped; see events() for why");
  }

  private deliver(event: ServerEvent): void {
    this.queue.push(event);
    const response = event.response;
    if (!response || response.status !== "completed") return;
    const calls = response.toolCalls.filter((call) => this.tools.has(call.name));
    if (calls.length) void this.runTools(calls);
  }

  private async runTools(calls: ToolCall[]): Promise<void> {
    for (const call of calls) {
      let output: string;
      try {
        const args = call.arguments.trim() ? JSON.parse(call.arguments) : {};
        const result = await (this.tools.get(call.name) as Tool).handler(args);
        output = typeof result === "string" ? result : JSON.stringify(result);
      } catch (error) {
        output = JSON.stringify({ error: { code: "tool_failed", message: String(error) } });
      }
      await this.sendToolOutput(call.callId, output);
    }
    await this.createResponse();
  }

  private setState(change: Partial<StateChange> & { state: ConnectionState }): void {
    this.state = change.state;
    this.options.onState?.({
      attempt: 0,
      delayMs: 0,
      closeCode: null,
      reason: "",
      error: null,
      ...change,
    });
  }
}

/**
 * The text of one response, as it streams: `for await (const delta of stream)`.
 * Follows tool rounds until a response ends without calling a tool; then
 * `response` is the last response and `responses` all of them.
 */
export class TextStream implements AsyncIterable<string> {
  readonly responses: Response[] = [];

  constructor(
    private readonly client: RealtimeClient,
    private readonly input: string | undefined,
    private readonly fields: JSONObject | undefined,
  ) {}

  get response(): Response {
    const last = this.responses[this.responses.length - 1];
    if (!last) throw new Error("the response has not ended yet");
    return last;
  }

  get text(): string {
    return this.responses.map((response) => response.text).join("");
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<string, void, undefined> {
    if (this.input !== undefined) await this.client.addText(this.input);
    const requestId = await this.client.createResponse(this.fields);
    for await (const event of this.client.events()) {
      if (event.type === "response.output_text.delta") {
        yield event.delta;
      } else if (event.type === "response.done" && event.response) {
        this.responses.push(event.response);
        if (!(event.response.status === "completed" && event.response.toolCalls.length)) return;
      } else if (event.type === "error") {
        const error: JSONObject = event.data.error ?? {};
        if (error.event_id === requestId || error.code === "tool_rounds_exceeded") {
          throw new RequestFailed(String(error.code), String(error.message));
        }
      }
    }
  }
}

interface Opened {
  socket: SocketLike;
  // Frames, and the close, that came before `serve` listened.
  early: unknown[];
  closed: { code: number; reason: string } | null;
}

interface NodeResponse {
  statusCode: number;
  headers: Record<string, string | undefined>;
  on(event: string, listener: (chunk: Uint8Array) => void): void;
}

declare const Buffer: { concat(chunks: Uint8Array[]): { toString(): string } };

function refusal(body: string): { code: string; message: string } {
  try {
    const error = JSON.parse(body)?.error ?? {};
    return { code: String(error.code ?? ""), message: String(error.message ?? "").slice(0, 300) };
  } catch {
    return { code: "", message: "" };
  }
}

/** Drop a socket without waiting: abruptly where possible (`ws`), else closed unheard. */
function abandon(socket: SocketLike): void {
  socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
  try {
    if (socket.terminate) socket.terminate();
    else socket.close(4000, "dropped");
  } catch {
    // already closed
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((wake) => setTimeout(wake, ms));
}
