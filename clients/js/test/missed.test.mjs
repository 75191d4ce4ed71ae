// A resume from before what the server still keeps: `resumed: false`, the `missed` event, no gap error.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { JEJU, Server, memoryStorage, mint, next, open } from "./helpers.mjs";

// Durable events are kept for 0.86 s here, and pruned every 0.2 s.
const CONFIG = `
[inbox]
retention_days = 0.00001
prune_interval_s = 0.2
`;

let server;
before(async () => {
  server = await Server.start(CONFIG);
});
after(async () => {
  await server?.stop();
});

test("events pruned while away are reported as missed; the session goes on from the oldest kept", async () => {
  const storage = memoryStorage();
  const answerer = open(server.url, mint("pruned-answerer", { local: true }));
  const first = open(server.url, mint("forgetful"), { storage });
  const delivered = [];
  first.on("answer_notification", (ev) => delivered.push(ev.seq));
  let second;
  let probe;
  try {
    await Promise.all([answerer.opened, first.opened]);
    const { question } = await first.request("create_question", { title: "Short memory", location: JEJU });
    const answer = (n) => answerer.request("create_answer", { question_id: question.question_id, content: `Answer ${n}` });
    for (const n of [1, 2, 3]) {
      const got = next(first, "answer_notification");
      await answer(n);
      await got;
    }
    await first.close();
    for (const n of [4, 5, 6]) await answer(n);
    // Wait for the server to prune everything but the newest event (6).
    probe = open(server.url, mint("forgetful"));
    await probe.opened;
    for (;;) {
      const from = server.log.length;
      const { notifications } = await probe.request("list_notifications");
      if (notifications.map((n) => n.seq).join() === "6") break;
      await server.waitForLog(/"inbox_pruned"/, from);
    }

    second = open(server.url, mint("forgetful"), { storage });
    const missed = [];
    second.on("missed", (m) => missed.push(m));
    second.on("answer_notification", (ev) => delivered.push(ev.seq));
    const hello = await second.opened;
    assert.equal(hello.resumed, false);
    assert.equal(hello.oldest_seq, 6);
    while (second.lastSeq < 6) await next(second, "answer_notification");
    assert.deepEqual(missed, [{ from: 4, to: 5 }]);
    assert.deepEqual(delivered, [1, 2, 3, 6]);
    assert.equal(second.state, "open");
  } finally {
    await Promise.all([answerer.close(), first.close(), second?.close(), probe?.close()]);
  }
});
