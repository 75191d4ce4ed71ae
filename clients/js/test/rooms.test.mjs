// The rooms a session keeps across reconnects follow the app's intent: a leave whose reply was lost
// is not re-joined, and a room that cannot be re-joined any more is reported, not silently dropped.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { ConnectionLost } from "../dist/index.js";
import { JEJU, Relay, Server, mint, next, open, sleep } from "./helpers.mjs";

let server;
before(async () => {
  server = await Server.start();
});
after(async () => {
  await server?.stop();
});

/**
 * A viewer through a relay (to cut), an asker and its question (the viewer not in its room yet); `end()`
 * closes them all.
 */
async function viewerAndQuestion(name, title) {
  const relay = await Relay.start(server.port);
  const viewer = open(relay.url, mint(`${name}-viewer`), { backoff: { base: 20, max: 100 } });
  const asker = open(server.url, mint(`${name}-asker`));
  const end = async () => {
    await Promise.all([viewer.close(), asker.close()]);
    await relay.close();
  };
  try {
    await Promise.all([viewer.opened, asker.opened]);
    const { question } = await asker.request("create_question", { title, location: JEJU });
    return { relay, viewer, asker, qid: question.question_id, end };
  } catch (error) {
    await end();
    throw error;
  }
}

test("a leave_question whose reply is lost is not re-joined after the reconnect", async () => {
  const { relay, viewer, asker, qid, end } = await viewerAndQuestion("leave", "Is the ferry running?");
  const answerer = open(server.url, mint("leave-answerer", { local: true }));
  try {
    await answerer.opened;
    await viewer.request("join_question", { question_id: qid });
    assert.deepEqual(viewer.rooms, [qid]);

    const cut = relay.cutBeforeReply();
    const leaving = viewer.request("leave_question", { question_id: qid });
    await cut;
    await assert.rejects(leaving, (error) => error instanceof ConnectionLost && error.sent === true);
    const rejoined = [];
    viewer.on("rejoined", (reply) => rejoined.push(reply.question.question_id));
    await next(viewer, "state", (state) => state === "open");
    assert.deepEqual(viewer.rooms, []);

    const answers = [];
    viewer.on("new_answer", (ev) => answers.push(ev.data.answer.answer_id));
    const asked = next(asker, "new_answer");
    await answerer.request("create_answer", { question_id: qid, content: "Yes, every hour." });
    await asked; // the room's broadcast is out: the viewer, having left, got none of it
    await sleep(100);
    assert.deepEqual(answers, []);
    assert.deepEqual(rejoined, []);
  } finally {
    await answerer.close();
    await end();
  }
});

test("a room deleted while the session was away is reported with rejoin_failed", async () => {
  const { relay, viewer, asker, qid, end } = await viewerAndQuestion("gone", "Any rain in Seogwipo?");
  try {
    await viewer.request("join_question", { question_id: qid });
    relay.hold();
    relay.sever();
    await next(viewer, "disconnected");
    await asker.request("delete_question", { question_id: qid });
    const failed = next(viewer, "rejoin_failed");
    relay.release();
    const { question_id, error } = await failed;
    assert.equal(question_id, qid);
    assert.equal(error.code, "not_found");
    assert.deepEqual(viewer.rooms, []);
  } finally {
    await end();
  }
});

test("a join and a leave asked at once, the join answered last: the room stays left", async () => {
  const { relay, viewer, qid, end } = await viewerAndQuestion("quick", "Is the market open?");
  try {
    const joining = viewer.request("join_question", { question_id: qid }); // a quick back-navigation
    const leaving = viewer.request("leave_question", { question_id: qid });
    await Promise.all([joining, leaving]);
    assert.deepEqual(viewer.rooms, []);
    const rejoined = [];
    viewer.on("rejoined", (reply) => rejoined.push(reply.question.question_id));
    relay.sever();
    await next(viewer, "disconnected");
    await next(viewer, "state", (state) => state === "open");
    assert.deepEqual(viewer.rooms, []);
    assert.deepEqual(rejoined, []);
  } finally {
    await end();
  }
});

test("a question asked at the connection's cap of rooms is made but not taken for a room", async () => {
  const capped = await Server.start("[limits]\nrooms_per_connection = 1\n");
  const asker = open(capped.url, mint("capped-asker"));
  try {
    await asker.opened;
    const first = await asker.request("create_question", { title: "Is the ferry running?", location: JEJU });
    const second = await asker.request("create_question", { title: "Any rain in Seogwipo?", location: JEJU });
    assert.deepEqual([first.joined, second.joined], [true, false]);
    assert.deepEqual(asker.rooms, [first.question.question_id]);
  } finally {
    await asker.close();
    await capped.stop();
  }
});
