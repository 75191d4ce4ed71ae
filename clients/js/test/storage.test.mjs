// lastSeq survives a reload through `storage`, kept per user.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { JEJU, Server, memoryStorage, mint, next, open } from "./helpers.mjs";

let server;
before(async () => {
  server = await Server.start();
});
after(async () => {
  await server?.stop();
});

test("a new session with the same storage resumes where the last one stopped, without re-delivering", async () => {
  const storage = memoryStorage();
  const answerer = open(server.url, mint("storage-answerer", { local: true }));
  const first = open(server.url, mint("storage-asker"), { storage });
  const delivered = [];
  const track = (session) => session.on("answer_notification", (ev) => delivered.push(ev.seq));
  track(first);
  let second;
  try {
    await Promise.all([answerer.opened, first.opened]);
    assert.equal(first.hello.resumed, undefined); // nothing stored: a fresh start
    const { question } = await first.request("create_question", { title: "Remember me", location: JEJU });
    const answer = (n) => answerer.request("create_answer", { question_id: question.question_id, content: `Answer ${n}` });
    for (const n of [1, 2, 3]) {
      const got = next(first, "answer_notification");
      await answer(n);
      await got;
    }
    await first.close(); // the page goes away
    assert.deepEqual([...storage.map.values()], ["3"]);
    await answer(4);
    await answer(5);

    second = open(server.url, mint("storage-asker"), { storage }); // the page comes back
    track(second);
    const hello = await second.opened;
    assert.equal(hello.resumed, true);
    while (second.lastSeq < 5) await next(second, "answer_notification");
    assert.deepEqual(delivered, [1, 2, 3, 4, 5]);
    await second.close(); // waits for the storage's last write
    assert.equal(storage.map.get(`dongne-client:${server.url}:storage-asker:last_seq`), "5");

    // Another user on the same device never resumes from this user's seq.
    const other = open(server.url, mint("storage-other"), { storage });
    assert.equal((await other.opened).resumed, undefined);
    assert.equal(other.lastSeq, 0);
    await other.close();
  } finally {
    await Promise.all([answerer.close(), first.close(), second?.close()]);
  }
});
