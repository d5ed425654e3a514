// The pure parts of the TypeScript client (run by `npm test` or `node --test test/`,
// after `npm run build`): the backoff and the event tracker.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Backoff, EventTracker, closeIsTerminal } from "../dist/index.js";

function seeded(seed) {
  // mulberry32: a small seeded PRNG, so a failure can be replayed.
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test("full-jitter delays are bounded and spread", () => {
  const seed = Math.floor(Math.random() * 2 ** 30);
  const backoff = new Backoff({ baseMs: 500, maxMs: 8000, random: seeded(seed) });
  for (let retry = 0; retry < 8; retry++) {
    const cap = backoff.cap(retry);
    assert.equal(cap, Math.min(8000, 500 * 2 ** retry));
    const delays = Array.from({ length: 2000 }, () => backoff.delay(retry));
    assert.ok(delays.every((d) => d >= 0 && d <= cap), `seed ${seed}`);
    const deciles = Array.from({ length: 10 }, (_, k) =>
      delays.filter((d) => d >= (k * cap) / 10 && d < ((k + 1) * cap) / 10).length,
    );
    assert.ok(Math.min(...deciles) > 120, `seed ${seed}: ${deciles}`);
  }
  assert.ok(new Backoff({ baseMs: 100, maxMs: 5000 }).delay(0, 2000) >= 2000);
  assert.equal(new Backoff({ baseMs: 100, maxMs: 5000 }).delay(0, 60000), 5000);
});

test("close codes are read as the server's catalogue says", () => {
  for (const code of [1000, 1011, 1012, 1013, 4008, 4010, 4011, 4499]) assert.ok(!closeIsTerminal(code));
  for (const code of [1008, 4500, 4501, 4503, 4504, 4509, 4529, 4999]) assert.ok(closeIsTerminal(code));
  assert.ok(!closeIsTerminal(null));
});

test("the tracker delivers each event once and marks a lost response resumed", () => {
  const tracker = new EventTracker();
  tracker.accept({ type: "session.created", event_id: "e1", session: { id: "sess_1" } });
  tracker.accept({ type: "response.created", event_id: "e2", response: { id: "r1" } });
  const delta = (n, text) => ({ type: "response.output_text.delta", event_id: `e${n}`, response_id: "r1", delta: text });
  assert.ok(tracker.accept(delta(3, "a")));
  tracker.connectionLost();
  assert.equal(tracker.accept(delta(3, "a")), null);
  assert.ok(tracker.accept(delta(4, "b")));
  const done = tracker.accept({ type: "response.done", event_id: "e5", response: { id: "r1", status: "completed", output: [] } });
  assert.deepEqual([done.response.text, done.response.resumed, done.response.interrupted], ["ab", true, false]);
  assert.equal(tracker.duplicates, 1);
  assert.equal(tracker.sessionId, "sess_1");
  assert.equal(tracker.lastEventId, "e5");
});

test("unanswered client events are known after the sync", () => {
  const tracker = new EventTracker();
  tracker.sent({ type: "conversation.item.create", event_id: "c1", item: { id: "item_1" } });
  tracker.sent({ type: "response.create", event_id: "c2" });
  const sync = tracker.syncEvent();
  tracker.accept({ type: "conversation.item.added", event_id: "e1", item: { id: "item_1" } });
  assert.equal(tracker.accept({ type: "error", event_id: "e2", error: { code: "item_not_found", event_id: sync.event_id } }), null);
  assert.ok(tracker.synced);
  assert.deepEqual(tracker.unanswered().map((e) => e.event_id), ["c2"]);
});
