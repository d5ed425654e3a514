// The demo page: a conversation through the TypeScript SDK (served from /sdk/),
// authenticated with an ek_ secret this page asks its server for. The page
// never sees a tenant key.
import { Backoff, RealtimeClient } from "/sdk/index.js";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const log = $("log");
const stateLabel = $("state");
const counts = { cuts: 0, resumes: 0 };
const turns = new Map(); // response id -> its elements
const tools = new Map(); // call id -> its card
let sentAt = null; // when the user's last message was sent, for the time to first token
let firstTokenPending = false;
let eventCount = 0;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showState(change) {
  stateLabel.textContent = change.state + (change.state === "resuming" ? ` (attempt ${change.attempt})` : "");
  stateLabel.dataset.state = change.state;
  if (change.state === "connected" && change.reason === "resumed") counts.resumes += 1;
  $("counts").textContent = `· cuts ${counts.cuts} · resumes ${counts.resumes}`;
}

async function tokenProvider() {
  const answer = await fetch("/token", { method: "POST" });
  if (!answer.ok) throw new Error(`no secret: HTTP ${answer.status}`);
  const secret = await answer.json();
  return { value: secret.value, expiresAt: secret.expires_at };
}

function logEvent(event) {
  eventCount += 1;
  $("event-count").textContent = String(eventCount);
  const entry = element("li");
  const details = element("details");
  details.append(element("summary", "", `${event.type} ${event.eventId}`));
  details.append(element("pre", "", JSON.stringify(event.data, null, 2)));
  entry.append(details);
  log.append(entry);
  while (log.children.length > 400) log.firstElementChild.remove();
}

function addTurn(who, text) {
  const item = element("li", `turn ${who}`);
  item.append(element("div", "who", who === "user" ? "You" : "Assistant"));
  const body = element("div", "text", text);
  item.append(body);
  const meta = element("div", "meta");
  item.append(meta);
  conversation.append(item);
  item.scrollIntoView({ block: "end" });
  return { item, body, meta };
}

function assistantTurn(responseId) {
  let turn = turns.get(responseId);
  if (!turn) {
    turn = addTurn("assistant", "");
    turn.item.dataset.responseId = responseId;
    turn.item.dataset.status = "streaming";
    turns.set(responseId, turn);
  }
  return turn;
}

function render(event) {
  const data = event.data;
  switch (event.type) {
    case "response.created":
      assistantTurn(data.response.id);
      $("cut").disabled = false;
      break;
    case "response.output_text.delta": {
      const turn = assistantTurn(data.response_id);
      turn.body.textContent += event.delta;
      if (firstTokenPending && sentAt !== null) {
        firstTokenPending = false;
        turn.item.dataset.ttftMs = String(Math.round(performance.now() - sentAt));
        turn.meta.textContent = `first token in ${turn.item.dataset.ttftMs} ms`;
      }
      break;
    }
    case "response.output_item.done":
      if (data.item.type === "function_call") {
        const card = element("li", "tool");
        card.dataset.tool = data.item.name;
        card.append(element("div", "who", `Tool call: ${data.item.name}`));
        card.append(element("div", "call", `${data.item.name}(${data.item.arguments})`));
        const result = element("div", "result", "running…");
        card.append(result);
        tools.set(data.item.call_id, result);
        conversation.append(card);
      }
      break;
    case "conversation.item.added":
      if (data.item.type === "function_call_output" && tools.has(data.item.call_id)) {
        tools.get(data.item.call_id).textContent = `→ ${data.item.output}`;
      }
      break;
    case "response.done": {
      const response = event.response;
      const turn = assistantTurn(response.id);
      turn.item.dataset.status = response.status;
      if (!response.text && response.toolCalls.length) {
        turn.item.remove(); // a response that only called tools: its card says it all
      }
      const notes = [];
      if (turn.meta.textContent) notes.push(turn.meta.textContent);
      if (response.status !== "completed") notes.push(response.status);
      turn.meta.textContent = notes.join(" · ");
      if (response.resumed) turn.meta.append(" ", element("span", "badge resumed", "resumed: nothing lost"));
      if (response.interrupted) turn.meta.append(" ", element("span", "badge interrupted", "interrupted"));
      $("cut").disabled = true;
      break;
    }
    case "error":
      addTurn("assistant", `Error: ${data.error.message}`).item.dataset.status = "error";
      break;
  }
}

async function main() {
  const config = await (await fetch("/config.json")).json();
  const client = new RealtimeClient({
    url: config.urls,
    model: config.model,
    tokenProvider,
    onState: showState,
    backoff: new Backoff({ baseMs: 200, maxMs: 3000, maxAttempts: null }),
  });
  window.switchboardClient = client; // for the curious, in the console

  $("ask").addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const text = $("message").value.trim();
    if (!text) return;
    $("message").value = "";
    addTurn("user", text);
    sentAt = performance.now();
    firstTokenPending = true;
    await client.addText(text);
    await client.createResponse();
  });
  $("cut").addEventListener("click", () => {
    counts.cuts += 1;
    client.dropConnection();
  });
  for (const button of document.querySelectorAll("[data-example]")) {
    button.addEventListener("click", () => {
      $("message").value = button.dataset.example;
      $("message").focus();
    });
  }

  await client.connect();
  document.body.dataset.ready = "true";
  for await (const event of client.events()) {
    logEvent(event);
    render(event);
  }
}

main().catch((error) => {
  stateLabel.textContent = `closed: ${error.message}`;
  stateLabel.dataset.state = "closed";
});
