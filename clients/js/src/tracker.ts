/**
 * The client's protocol core, with no I/O: exactly-once delivery, where to
 * resume from, how each response went, and which client events the server has
 * not answered yet. The same core as the Python SDK's tracker.py.
 *
 * A resume replays the session's log after `lastEventId` before answering any
 * client event, so when the answer to `syncEvent()` arrives, every event the
 * server recorded for an unanswered client event has been delivered, and what
 * is still unanswered never reached it.
 */
import type { JSONObject, Response, ServerEvent, ToolCall } from "./events.js";

export const SYNC_PREFIX = "sbc_sync_";
export const SYNC_ITEM_ID = "sbc_sync_none";

const ANSWERS: Record<string, string[]> = {
  "conversation.item.added": ["conversation.item.create"],
  "conversation.item.retrieved": ["conversation.item.retrieve"],
  "conversation.item.deleted": ["conversation.item.delete"],
  "session.updated": ["session.update"],
  "response.created": ["response.create"],
  "response.done": ["response.cancel"],
};

interface OpenResponse {
  parts: string[];
  lost: boolean;
}

export class EventTracker {
  sessionId: string | null = null;
  lastEventId: string | null = null;
  /** Events dropped because they had been delivered already. */
  duplicates = 0;
  /** Connections lost while a response streamed. */
  losses = 0;
  private readonly seen = new Set<string>();
  private readonly seenOrder: string[] = [];
  private readonly open = new Map<string, OpenResponse>();
  private readonly unansweredEvents = new Map<string, JSONObject>();
  private syncCount = 0;
  private syncWaiting: string | null = null;

  constructor(private readonly remember = 50_000) {}

  /** The event to deliver for a frame, or null when it was delivered before. */
  accept(raw: JSONObject): ServerEvent | null {
    const eventId = typeof raw.event_id === "string" ? raw.event_id : "";
    if (eventId) {
      if (this.seen.has(eventId)) {
        this.duplicates += 1;
        return null;
      }
      this.rememberId(eventId);
      this.lastEventId = eventId;
    }
    const type = String(raw.type ?? "");
    this.answered(type, raw);
    if (type === "error" && errorField(raw, "event_id").startsWith(SYNC_PREFIX)) {
      if (errorField(raw, "event_id") === this.syncWaiting) this.syncWaiting = null;
      return null;
    }
    let response: Response | null = null;
    if (type === "session.created") {
      this.sessionId = raw.session?.id ?? this.sessionId;
    } else if (type === "response.created") {
      this.open.set(String(raw.response?.id ?? ""), { parts: [], lost: false });
    } else if (type === "response.output_text.delta") {
      this.open.get(String(raw.response_id ?? ""))?.parts.push(String(raw.delta ?? ""));
    } else if (type === "response.done") {
      response = this.finish(raw);
    }
    const delta = typeof raw.delta === "string" ? raw.delta : "";
    return { type, eventId, data: raw, delta, response };
  }

  /** The connection ended: responses still streaming are resumed (or not). */
  connectionLost(): void {
    if (this.open.size) this.losses += 1;
    for (const open of this.open.values()) open.lost = true;
    this.syncWaiting = null;
  }

  get streaming(): boolean {
    return this.open.size > 0;
  }

  sent(event: JSONObject): void {
    this.unansweredEvents.set(String(event.event_id), event);
  }

  unanswered(): JSONObject[] {
    return [...this.unansweredEvents.values()];
  }

  syncEvent(): JSONObject {
    this.syncCount += 1;
    this.syncWaiting = `${SYNC_PREFIX}${this.syncCount}`;
    return { type: "conversation.item.retrieve", event_id: this.syncWaiting, item_id: SYNC_ITEM_ID };
  }

  get synced(): boolean {
    return this.syncWaiting === null;
  }

  private finish(raw: JSONObject): Response {
    const data: JSONObject = raw.response ?? {};
    const id = String(data.id ?? "");
    const open = this.open.get(id) ?? { parts: [], lost: false };
    this.open.delete(id);
    const status = String(data.status ?? "");
    const details: JSONObject = data.status_details ?? {};
    const errorCode: string | null = details.error?.code ?? null;
    const interrupted =
      (status === "failed" && errorCode === "response_interrupted") ||
      (status === "cancelled" && details.reason === "client_disconnected");
    const toolCalls: ToolCall[] = (data.output ?? [])
      .filter((item: JSONObject) => item.type === "function_call")
      .map((item: JSONObject) => ({
        callId: String(item.call_id),
        name: String(item.name),
        arguments: String(item.arguments ?? ""),
      }));
    return {
      id,
      status,
      text: open.parts.join(""),
      toolCalls,
      resumed: open.lost && !interrupted,
      interrupted,
      errorCode,
      data,
    };
  }

  private rememberId(eventId: string): void {
    this.seen.add(eventId);
    this.seenOrder.push(eventId);
    if (this.seenOrder.length > this.remember) {
      this.seen.delete(this.seenOrder.shift() as string);
    }
  }

  private answered(type: string, raw: JSONObject): void {
    if (type === "error") {
      this.unansweredEvents.delete(errorField(raw, "event_id"));
      return;
    }
    const answers = ANSWERS[type];
    if (!answers) return;
    let itemId = "";
    if (type === "conversation.item.added" || type === "conversation.item.retrieved") {
      itemId = String(raw.item?.id ?? "");
    } else if (type === "conversation.item.deleted") {
      itemId = String(raw.item_id ?? "");
    }
    for (const [eventId, event] of this.unansweredEvents) {
      if (answers.includes(event.type) && (!itemId || ["", itemId].includes(itemIdOf(event)))) {
        this.unansweredEvents.delete(eventId);
        return;
      }
    }
  }
}

function itemIdOf(event: JSONObject): string {
  const value = event.item && typeof event.item === "object" ? event.item.id : event.item_id;
  return typeof value === "string" ? value : "";
}

function errorField(raw: JSONObject, name: string): string {
  const value = raw.error && typeof raw.error === "object" ? raw.error[name] : undefined;
  return typeof value === "string" ? value : "";
}
