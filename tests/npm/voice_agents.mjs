// The JS Agents SDK (@openai/agents, RealtimeSession over its WebSocket transport in
// Node) speaks a turn to a voice model through the gateway; the model calls a
// function tool, the SDK runs it, and the spoken reply follows
// (tests/e2e/test_voice_agents_npm.py drives it).
//
// Environment: SB_WS (the gateway's /v1/realtime URL), SB_KEY (a tenant key),
// SB_MODEL (the voice model), SB_AUDIO (a file of PCM16 24 kHz mono speech),
// SB_SIM (the simulator directive for the agent's instructions).
// Prints one JSON line: what the session saw.
import { readFileSync } from 'node:fs';
import { RealtimeAgent, RealtimeSession, tool } from '@openai/agents/realtime';
import { z } from 'zod';

const env = process.env;
const calls = [];
const getWeather = tool({
  name: 'get_weather',
  description: 'The weather in a city.',
  parameters: z.object({ city: z.string() }),
  execute: async ({ city }) => {
    calls.push(city);
    return `rain in ${city}`;
  },
});
const agent = new RealtimeAgent({
  name: 'Forecaster',
  instructions: `Answer briefly. ${env.SB_SIM}`,
  tools: [getWeather],
});
const session = new RealtimeSession(agent, { transport: 'websocket', model: env.SB_MODEL });

const seen = { calls, errors: [], audioBytes: 0, toolOutput: null, transcript: '', types: [] };
const finished = new Promise((resolve, reject) => {
  session.on('error', (event) => seen.errors.push(JSON.stringify(event.error)));
  session.on('agent_tool_end', (_context, _agent, _tool, result) => {
    seen.toolOutput = result;
  });
  session.on('audio', (event) => {
    seen.audioBytes += event.data.byteLength;
  });
  session.on('transport_event', (event) => {
    seen.types.push(event.type);
    if (event.type === 'response.output_audio_transcript.done' && seen.toolOutput !== null) {
      seen.transcript = event.transcript;
    }
    if (event.type === 'response.done' && seen.transcript) resolve();
  });
  const fail = () => reject(new Error(`no spoken reply after the tool: ${JSON.stringify(seen)}`));
  setTimeout(fail, 30_000).unref(); // a bound, not a measure: the process exits when done
});

await session.connect({ apiKey: env.SB_KEY, url: `${env.SB_WS}?model=${env.SB_MODEL}` });
const pcm = readFileSync(env.SB_AUDIO);
for (let start = 0; start < pcm.length; start += 960) {
  // 20 ms chunks, in real time.
  const chunk = pcm.subarray(start, start + 960);
  session.sendAudio(chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength));
  await new Promise((resolve) => setTimeout(resolve, 20));
}
try {
  await finished;
} finally {
  session.close();
}
console.log(JSON.stringify({ ...seen, types: [...new Set(seen.types)] }));
