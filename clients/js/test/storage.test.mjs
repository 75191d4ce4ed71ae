// lastSeq survives a reload through `storage`, kept per user.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { JEJU, Relay, Server, memoryStorage, mint, next, open, until } from "./helpers.mjs";

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

test("a storage without get/set (a DOM Storage passed as it is) is refused at once", () => {
  const domLike = { getItem: () => null, setItem: () => {} };
  assert.throws(() => open(server.url, mint("storage-dom"), { storage: domLike }), /get\(key\) and set\(key, value\)/);
});

test("a storage whose get() fails is read again on the next attempt, not taken for 'nothing stored'", async () => {
  const storage = memoryStorage();
  const answerer = open(server.url, mint("flaky-answerer", { local: true }));
  const first = open(server.url, mint("flaky-asker"), { storage });
  let second;
  try {
    await Promise.all([answerer.opened, first.opened]);
    const { question } = await first.request("create_question", { title: "Flaky storage", location: JEJU });
    const answer = (n) => answerer.request("create_answer", { question_id: question.question_id, content: `Answer ${n}` });
    const got = next(first, "answer_notification");
    await answer(1);
    await got;
    await first.close();
    await answer(2); // sent while no page is open: must reach the next one

    let fails = 1;
    const flaky = {
      get: async (key) => {
        if (fails-- > 0) throw new Error("AsyncStorage is not ready");
        return storage.get(key);
      },
      set: storage.set,
    };
    const errors = [];
    const reasons = [];
    second = open(server.url, mint("flaky-asker"), { storage: flaky, backoff: { base: 20, max: 50 } });
    second.on("storage_error", (e) => errors.push([e.operation, String(e.error)]));
    second.on("disconnected", (d) => reasons.push(d.reason));
    const delivered = [];
    second.on("answer_notification", (ev) => delivered.push(ev.seq));
    const hello = await second.opened;
    assert.deepEqual(errors, [["get", "Error: AsyncStorage is not ready"]]);
    assert.match(reasons[0], /^storage\.get\(\) failed/); // not "getToken() failed"
    assert.equal(hello.resumed, true); // resumed from the stored seq, not a fresh start
    while (second.lastSeq < 2) await next(second, "answer_notification");
    assert.deepEqual(delivered, [2]);
  } finally {
    await Promise.all([answerer.close(), first.close(), second?.close()]);
  }
});

test("a failing set() is reported as storage_error", async () => {
  const session = open(server.url, mint("set-fails"), {
    storage: { get: () => null, set: () => Promise.reject(new Error("quota exceeded")) },
  });
  const answerer = open(server.url, mint("set-fails-answerer", { local: true }));
  try {
    await Promise.all([session.opened, answerer.opened]);
    const failed = next(session, "storage_error");
    const { question } = await session.request("create_question", { title: "Full storage", location: JEJU });
    await answerer.request("create_answer", { question_id: question.question_id, content: "Hello" });
    const error = await failed;
    assert.equal(error.operation, "set");
    assert.match(String(error.error), /quota exceeded/);
  } finally {
    await Promise.all([session.close(), answerer.close()]);
  }
});

test("another user's token: the rooms and location of the first are forgotten, the seq is the new user's", async () => {
  const relay = await Relay.start(server.port);
  let token = mint("switch-a");
  const session = open(relay.url, () => token, { backoff: { base: 20, max: 50 } });
  try {
    await session.opened;
    const { question } = await session.request("create_question", { title: "A's question", location: JEJU });
    assert.deepEqual(session.rooms, [question.question_id]);
    await session.request("update_location", { location: JEJU });
    assert.notEqual(session.location, null);
    const changed = next(session, "user_changed");
    const rejoined = [];
    session.on("rejoined", (r) => rejoined.push(r.question.question_id));
    token = mint("switch-b");
    relay.sever();
    assert.deepEqual(await changed, { from: "switch-a", to: "switch-b" });
    await until(() => session.state === "open" && session.user?.user_id === "switch-b");
    assert.equal(session.user.user_id, "switch-b");
    assert.deepEqual(session.rooms, []);
    assert.equal(session.location, null);
    assert.deepEqual(rejoined, []);
  } finally {
    await session.close();
    await relay.close();
  }
});

test("a slow storage still writing when the user changes keeps each user's seq under its own key", async () => {
  // An asynchronous storage (React Native's AsyncStorage): each set() takes a while.
  const map = new Map();
  const storage = {
    get: (key) => map.get(key) ?? null,
    set: (key, value) => new Promise((resolve) => setTimeout(() => { map.set(key, value); resolve(); }, 150)),
  };
  const relay = await Relay.start(server.port);
  const keyOf = (user) => `dongne-client:${relay.url}:${user}:last_seq`;
  const answerer = open(server.url, mint("slow-answerer", { local: true }));
  const carol0 = open(server.url, mint("slow-carol"));
  let token = mint("slow-alice");
  const session = open(relay.url, () => token, { storage, backoff: { base: 20, max: 50 } });
  try {
    await Promise.all([answerer.opened, carol0.opened]);
    const { question: carols } = await carol0.request("create_question", { title: "Carol's ferry", location: JEJU });
    await answerer.request("create_answer", { question_id: carols.question_id, content: "Every hour." });
    await carol0.close(); // Carol has one event, seq 1, while away

    await session.opened;
    const { question } = await session.request("create_question", { title: "Alice's bus", location: JEJU });
    for (const n of [1, 2, 3]) {
      const got = next(session, "answer_notification");
      await answerer.request("create_answer", { question_id: question.question_id, content: `Bus ${n}` });
      await got;
    }
    // Alice's writes are still in flight: the app signs Carol in.
    token = mint("slow-carol");
    relay.sever();
    await next(session, "user_changed");
    await until(() => session.state === "open" && session.user?.user_id === "slow-carol");
    await session.close(); // waits for the storage's writes
    assert.equal(map.get(keyOf("slow-alice")), "3");
    assert.equal(map.get(keyOf("slow-carol")), String(session.lastSeq));
  } finally {
    await Promise.all([session.close(), answerer.close()]);
    await relay.close();
  }
});
