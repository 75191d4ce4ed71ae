// A reconnecting session re-joins its rooms after the server's replay, not during it:
// the server holds live frames back while it replays and counts them against the
// slow-consumer bound, so a room's join reply (every answer) arriving then could close
// the connection with 4009 on every reconnect, before anything was replayed.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { JEJU, Relay, Server, mint, next, open } from "./helpers.mjs";

const CONFIG = `
[server]
outbound_buffer_bytes = 65536
[limits]
conn_per_s = 100000.0
conn_burst = 100000.0
writes_per_minute = 1000000.0
writes_burst = 100000.0
`;

let server;
before(async () => {
  server = await Server.start(CONFIG);
});
after(async () => {
  await server?.stop();
});

test("a room whose join reply outgrows the buffer is re-joined after the replay, with nothing lost", async () => {
  const relay = await Relay.start(server.port);
  const asker = open(relay.url, mint("big-asker"), { backoff: { base: 20, max: 200 }, maxAttempts: 20 });
  const answerer = open(server.url, mint("big-answerer", { local: true }));
  try {
    await Promise.all([asker.opened, answerer.opened]);
    const { question } = await asker.request("create_question", { title: "Popular", location: JEJU });
    const qid = question.question_id;
    const closes = [];
    asker.on("disconnected", (d) => closes.push(d.code));
    const seqs = [];
    asker.on("answer_notification", (ev) => seqs.push(ev.seq));
    const first = asker.lastSeq;
    relay.hold(); // the asker hears nothing while 100 long answers arrive
    const long = Array.from({ length: 300 }, (_, i) => `w${i}`).join(" ").slice(0, 1000);
    for (let i = 0; i < 100; i++) {
      await answerer.request("create_answer", { question_id: qid, content: `${i} ${long}` });
    }
    relay.sever();
    relay.release();
    // The reconnection replays 100 notifications, then re-joins: about 100 KB of answers.
    const rejoined = await next(asker, "rejoined", () => true, 20000);
    assert.equal(rejoined.answers.length, 100);
    assert.equal(seqs.length, 100);
    assert.deepEqual(seqs, Array.from({ length: 100 }, (_, i) => first + 1 + i));
    assert.ok(!closes.includes(4009), `closed with ${closes}`);
    assert.equal(asker.state, "open");
  } finally {
    await asker.close();
    await answerer.close();
    await relay.close();
  }
});
