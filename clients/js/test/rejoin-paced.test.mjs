// Re-joins refused for now are retried one at a time, at the server's pace: retried together
// after the same retry_after_ms, all but one would be refused again, and every refusal counts
// towards the server's 4008 (abuse_refusals_per_minute), which ends the session for good.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { JEJU, Relay, Server, mint, next, open, sleep, until } from "./helpers.mjs";

// Every frame of a connection: 6 at once, then 20 a second. A reconnect's hello and twelve
// re-joins are thirteen frames: seven joins are refused at first. Retried together they would
// draw 7 + 6 + 5 + ... = 28 refusals; 20 close the connection with 4008.
const CONFIG = `
[limits]
conn_per_s = 20.0
conn_burst = 6.0
abuse_refusals_per_minute = 20
questions_per_hour = 1000.0
questions_burst = 100.0
`;
const ROOMS = 12;

let server;
before(async () => {
  server = await Server.start(CONFIG);
});
after(async () => {
  await server?.stop();
});

test("many rooms refused at a reconnect are re-joined one at a time, and the session stays", async () => {
  const relay = await Relay.start(server.port);
  const asker = open(relay.url, mint("paced-asker"), { backoff: { base: 20, max: 50 } });
  try {
    await asker.opened;
    const ids = [];
    for (let n = 0; n < ROOMS; n++) {
      await sleep(60); // within the connection's rate
      const { question } = await asker.request("create_question", { title: `Room ${n}`, location: JEJU });
      ids.push(question.question_id);
    }
    await sleep(600); // the bucket is full again: 6 frames
    const rejoined = [];
    const disconnects = [];
    asker.on("rejoined", (r) => rejoined.push(r.question.question_id));
    asker.on("disconnected", (d) => disconnects.push(d.code));
    relay.sever();
    await next(asker, "hello");
    await until(() => rejoined.length === ROOMS, 10000);

    assert.deepEqual(rejoined.sort(), [...ids].sort());
    assert.deepEqual(asker.rooms.sort(), [...ids].sort());
    assert.equal(asker.state, "open");
    assert.deepEqual(disconnects, [1006]); // the relay's cut, and no 4008 after it
  } finally {
    await asker.close();
    await relay.close();
  }
});
