// The official npm `openai` package against the gateway's SSE endpoints.
// Usage: SB_HTTP=http://host:port SB_KEY=sk-... node sse_openai.mjs
// Prints one JSON line: what each scenario saw.
import OpenAI from "openai";

const baseURL = `${process.env.SB_HTTP}/v1`;
const client = new OpenAI({ apiKey: process.env.SB_KEY, baseURL, maxRetries: 0 });
const WEATHER = '[[sim {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}]]';
const weatherTool = {
  type: "function",
  function: {
    name: "get_weather",
    parameters: { type: "object", properties: { city: { type: "string" } } },
  },
};

async function chatText() {
  const stream = await client.chat.completions.create({
    model: "gpt-realtime",
    messages: [{ role: "user", content: "Hello from npm" }],
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let finish = null;
  let usage = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      text += choice.delta?.content ?? "";
      finish = choice.finish_reason ?? finish;
    }
  }
  return { text, finish, usage, chunks };
}

async function chatTool() {
  const stream = await client.chat.completions.create({
    model: "gpt-realtime",
    messages: [{ role: "user", content: `weather please ${WEATHER}` }],
    tools: [weatherTool],
    stream: true,
  });
  const calls = {};
  let finish = null;
  for await (const chunk of stream) {
    for (const choice of chunk.choices) {
      for (const delta of choice.delta?.tool_calls ?? []) {
        const call = (calls[delta.index] ??= { id: "", name: "", arguments: "" });
        call.id ||= delta.id ?? "";
        call.name ||= delta.function?.name ?? "";
        call.arguments += delta.function?.arguments ?? "";
      }
      finish = choice.finish_reason ?? finish;
    }
  }
  return { calls: Object.values(calls), finish };
}

async function responsesText() {
  const stream = await client.responses.create({
    model: "gpt-realtime",
    input: "Hello from the Responses API",
    stream: true,
  });
  let text = "";
  const types = [];
  let completed = null;
  for await (const event of stream) {
    if (!types.includes(event.type)) types.push(event.type);
    if (event.type === "response.output_text.delta") text += event.delta;
    if (event.type === "response.completed") completed = event.response;
  }
  return { text, types, status: completed?.status, usage: completed?.usage };
}

async function refused(make) {
  try {
    await make();
    return { error: null };
  } catch (error) {
    return { error: error.constructor.name, status: error.status, code: error.code ?? null };
  }
}

const badKey = new OpenAI({ apiKey: "sk-not-a-key", baseURL, maxRetries: 0 });
const result = {
  chatText: await chatText(),
  chatTool: await chatTool(),
  responsesText: await responsesText(),
  badKey: await refused(() =>
    badKey.chat.completions.create({ model: "gpt-realtime", messages: [{ role: "user", content: "hi" }] }),
  ),
  noMessages: await refused(() =>
    client.chat.completions.create({ model: "gpt-realtime", messages: [] }),
  ),
};
console.log(JSON.stringify(result));
