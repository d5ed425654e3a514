// The TypeScript client (clients/js/dist) against the real stack, driven by
// tests/clients/test_js_sdk.py. Usage: node js_scenarios.mjs SCENARIO
// Environment: SB_URLS (gateway WebSocket URLs, comma-separated), SB_HTTP (the
// first gateway's http://host:port), SB_KEY (the development key), SB_SEED.
// Prints one JSON line per step; the last is the result. In `kill` and `drain`
// the script then reads one line of standard input once it is done. {"kill": URL} asks the test
// to SIGKILL the gateway at URL (the one serving the client); {"drain": URL} to
// SIGTERM it.
import { createInterface } from "node:readline";

import { AuthenticationError, Backoff, RealtimeClient } from "../../clients/js/dist/index.js";

const urls = process.env.SB_URLS.split(",");
const key = process.env.SB_KEY;
let seed = Number(process.env.SB_SEED);
const random = () => {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const say = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
const client = (options = {}) =>
  new RealtimeClient({
    url: urls,
    apiKey: key,
    backoff: new Backoff({ baseMs: 50, maxMs: 500, maxAttempts: 40 }),
    pingIntervalMs: 1000,
    ...options,
  });

/** Read events to `response.done`; `onEvent(event, count)` may act on each. */
async function readResponse(sdk, seen, onEvent = () => {}) {
  for await (const event of sdk.events()) {
    seen.push(event);
    await onEvent(event, seen.length);
    if (event.type === "response.done") return event.response;
  }
  throw new Error("events ended");
}

function repeats(seen) {
  const ids = seen.map((e) => e.eventId).filter(Boolean);
  return ids.length - new Set(ids).size;
}

const textOf = (seen) =>
  seen.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join("");

async function uninterrupted(prompt) {
  const sdk = client();
  await sdk.connect();
  const stream = sdk.streamText(prompt);
  for await (const _ of stream);
  await sdk.close();
  return stream.response.text;
}

const scenarios = {
  async voice() {
    // A voice session's reply audio across a dropped socket (docs/voice.md#resume).
    const replyMs = 3000;
    const sdk = client({ model: "gpt-realtime-voice" });
    await sdk.connect();
    const instructions = `[[sim {"audio_ms": ${replyMs}}]]`;
    await sdk.send({ type: "session.update", session: { type: "realtime", instructions } });
    await sdk.addText("tell me about Paris");
    await sdk.createResponse();
    const seen = [];
    let deltas = 0;
    const response = await readResponse(sdk, seen, (event) => {
      if (event.type === "response.output_audio.delta" && ++deltas === 5) sdk.dropConnection();
    });
    const audioBytes = seen
      .filter((e) => e.type === "response.output_audio.delta")
      .reduce((bytes, e) => bytes + Buffer.from(e.data.delta, "base64").length, 0);
    const next = sdk.createResponse();
    await next;
    const again = await readResponse(sdk, []);
    await sdk.close();
    return {
      status: response.status,
      resumed: response.resumed,
      audioMs: audioBytes / 48,
      replyMs,
      repeats: repeats(seen),
      duplicates: sdk.tracker.duplicates,
      next: again.status,
    };
  },

  async drops() {
    const prompt = 'resume me [[sim {"tokens": 60, "token_delay_ms": 8}]]';
    const expected = await uninterrupted(prompt);
    const result = { cuts: 0, resumed: 0, duplicates: 0, repeats: 0, mismatches: 0, trials: 6 };
    for (let trial = 0; trial < result.trials; trial++) {
      const sdk = client();
      await sdk.connect();
      const cutAfter = 1 + Math.floor(random() * 40);
      const seen = [];
      await sdk.addText(prompt);
      await sdk.createResponse();
      const response = await readResponse(sdk, seen, (event, count) => {
        if (count === cutAfter && event.type !== "response.done") {
          // A cut before `response.created` loses no response: not counted.
          if (sdk.tracker.streaming) result.cuts += 1;
          sdk.dropConnection();
        }
      });
      if (textOf(seen) !== expected || response.text !== expected || response.status !== "completed") {
        result.mismatches += 1;
        say({ trial, cutAfter, got: textOf(seen), expected });
      }
      result.resumed += response.resumed ? 1 : 0;
      result.duplicates += sdk.tracker.duplicates;
      result.repeats += repeats(seen);
      // The session goes on after the resume.
      const next = sdk.streamText("and now?");
      for await (const _ of next);
      if (next.response.status !== "completed") result.mismatches += 1;
      await sdk.close();
    }
    return result;
  },

  async kill() {
    const prompt = 'kill me [[sim {"tokens": 80, "token_delay_ms": 10}]]';
    const expected = await uninterrupted(prompt);
    const states = [];
    const sdk = client({ onState: (change) => states.push(change.state) });
    await sdk.connect();
    const killAfter = 5 + Math.floor(random() * 35); // after response.created
    const seen = [];
    const input = createInterface({ input: process.stdin });
    const lines = input[Symbol.asyncIterator]();
    await sdk.addText(prompt);
    await sdk.createResponse();
    const response = await readResponse(sdk, seen, async (event, count) => {
      if (count === killAfter && event.type !== "response.done") {
        say({ kill: sdk.url });
        await lines.next();
      }
    });
    input.close();
    await sdk.close();
    return {
      killAfter,
      status: response.status,
      resumed: response.resumed,
      lostMidStream: sdk.tracker.losses === 1,
      same: textOf(seen) === expected,
      duplicates: sdk.tracker.duplicates,
      repeats: repeats(seen),
      resumes: sdk.resumes,
      states: [...new Set(states)],
    };
  },

  async drain() {
    // The test SIGTERMs the first gateway mid-response: it finishes the response,
    // closes with 1012, and the client resumes on the other gateway.
    const prompt = 'drain me [[sim {"tokens": 40, "token_delay_ms": 10}]]';
    const expected = await uninterrupted(prompt);
    const changes = [];
    const sdk = client({ onState: (change) => changes.push(change) });
    await sdk.connect();
    const seen = [];
    const input = createInterface({ input: process.stdin });
    const lines = input[Symbol.asyncIterator]();
    let asked = false;
    await sdk.addText(prompt);
    await sdk.createResponse();
    const response = await readResponse(sdk, seen, async (event) => {
      if (!asked && event.type === "response.output_text.delta") {
        asked = true;
        say({ drain: sdk.url });
        await lines.next();
      }
    });
    input.close();
    const after = sdk.streamText("after the drain");
    for await (const _ of after);
    await sdk.close();
    const resuming = changes.find((change) => change.state === "resuming");
    return {
      status: response.status,
      same: textOf(seen) === expected,
      next: after.response.status,
      closeCode: resuming ? resuming.closeCode : null,
      duplicates: sdk.tracker.duplicates,
      repeats: repeats(seen),
    };
  },

  async bad_key() {
    const states = [];
    const sdk = client({ apiKey: "sk-sb-not-a-key-of-anyone-000000", onState: (c) => states.push(c.state) });
    try {
      await sdk.connect();
      return { error: null };
    } catch (error) {
      return {
        error: error.constructor.name,
        auth: error instanceof AuthenticationError,
        status: error.status,
        states,
      };
    }
  },

  async provider() {
    const given = [];
    const mint = async () => {
      const answer = await fetch(`${process.env.SB_HTTP}/v1/realtime/client_secrets`, {
        method: "POST",
        headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
        body: JSON.stringify({ session: { type: "realtime", model: "gpt-realtime" } }),
      });
      return (await answer.json()).value;
    };
    const sdk = client({
      apiKey: undefined,
      tokenProvider: async () => {
        if (!given.length) {
          given.push("refused");
          return "ek_" + "0".repeat(40);
        }
        given.push("fresh");
        // Within the refresh margin: the next connection asks again.
        return { value: await mint(), expiresAt: Date.now() / 1000 + 3 };
      },
    });
    await sdk.connect();
    const afterConnect = given.length;
    const stream = sdk.streamText('hello [[sim {"tokens": 20, "token_delay_ms": 10}]]');
    let dropped = false;
    for await (const _ of stream) {
      if (!dropped) {
        dropped = true;
        sdk.dropConnection();
      }
    }
    await sdk.close();
    return { afterConnect, afterResume: given.length, resumed: stream.response.resumed };
  },

  async tools() {
    const calls = [];
    const sdk = client({
      tools: [
        {
          name: "get_weather",
          description: "The weather in a city.",
          parameters: { type: "object", properties: { city: { type: "string" } } },
          handler: async ({ city }) => {
            calls.push(city);
            return { city, sky: "clear" };
          },
        },
      ],
    });
    await sdk.connect();
    const call = { name: "get_weather", arguments: { city: "Oslo" } };
    const stream = sdk.streamText(`weather? [[sim ${JSON.stringify({ tool_calls: [call] })}]]`);
    for await (const _ of stream);
    await sdk.close();
    return { calls, statuses: stream.responses.map((r) => r.status), text: stream.response.text };
  },
};

const scenario = scenarios[process.argv[2]];
say({ result: await scenario() });
process.exit(0);
