// A room whose re-join is refused for now (rate_limited) is kept and joined again after
// retry_after_ms; only a room refused for good (not_found) is forgotten.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { JEJU, Relay, Server, mint, next, open, sleep, until } from "./helpers.mjs";

// Every frame of a connection: 4 at once, then 1 a second. A reconnect's hello and four
// re-joins are five frames: the last join is refused with rate_limited.
const CONFIG = `
[limits]
conn_per_s = 1.0
conn_burst = 4.0
questions_per_hour = 1000.0
questions_burst = 100.0
`;

let server;
before(async () => {
  server = await Server.start(CONFIG);
});
after(async () => {
  await server?.stop();
});

test("a re-join refused with rate_limited is tried again after retry_after_ms, not forgotten", async () => {
  const relay = await Relay.start(server.port);
  const asker = open(relay.url, mint("limited-asker"), { backoff: { base: 20, max: 50 } });
  try {
    await asker.opened;
    const ids = [];
    for (let n = 0; n < 4; n++) {
      await sleep(1100); // within the connection's rate
      const { question } = await asker.request("create_question", { title: `Room ${n}`, location: JEJU });
      ids.push(question.question_id);
    }
    assert.deepEqual(asker.rooms.sort(), [...ids].sort());
    await sleep(4500); // the bucket is full again: 4 frames

    const rejoined = [];
    asker.on("rejoined", (r) => rejoined.push(r.question.question_id));
    relay.sever();
    await next(asker, "hello");
    await until(() => asker.state === "open");
    // The fourth join was refused for now, and the session opened without waiting for it.
    assert.equal(rejoined.length, 3);
    assert.equal(asker.rooms.length, 4);
    await until(() => rejoined.length === 4, 5000);
    assert.deepEqual(rejoined.sort(), [...ids].sort());
    assert.deepEqual(asker.rooms.sort(), [...ids].sort());
  } finally {
    await asker.close();
    await relay.close();
  }
});
