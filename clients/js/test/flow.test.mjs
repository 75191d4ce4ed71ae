// The whole question flow between a traveller and a local, through the SDK, against a real server.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { ConnectionLost, RequestError, RequestTooLarge, SessionClosed } from "../dist/index.js";
import { JEJU, Server, mint, next, open } from "./helpers.mjs";

let server;
before(async () => {
  server = await Server.start();
});
after(async () => {
  await server?.stop();
});

test("a traveller asks, a local nearby is alerted at once, answers, and is accepted", async () => {
  const traveller = open(server.url, mint("traveller", { nick: "Mina" }));
  const local = open(server.url, mint("local1", { nick: "Jun", local: true, tags: ["food"] }));
  try {
    const states = [];
    traveller.on("state", (s) => states.push(s));
    const hello = await traveller.opened;
    await local.opened;
    assert.equal(hello.user.user_id, "traveller");
    assert.equal(traveller.user.nick, "Mina");
    assert.equal(traveller.state, "open");
    assert.deepEqual(states, ["open"]);

    // Both share their position in Jeju City; the local is about 800 m east.
    const here = await local.request("update_location", { location: { lat: 33.4996, lng: 126.5398 } });
    assert.equal(here.live, true);
    await traveller.request("update_location", { location: JEJU });
    assert.deepEqual(await traveller.request("nearby_locals"), { within_2km: 1, within_5km: 1 });

    const alerted = next(local, "new_question_notification");
    const { question } = await traveller.request("create_question", {
      title: "Where is the best black pork near the port?",
      body: "Arriving tonight.",
      location: JEJU,
      hashtags: ["#Food", "blackpork"],
    });
    assert.equal(question.region, "Jeju-si");
    assert.deepEqual(question.hashtags, ["food", "blackpork"]);
    assert.deepEqual(traveller.rooms, [question.question_id]);
    const alert = await alerted;
    assert.equal(alert.type, "new_question_notification");
    assert.equal(typeof alert.seq, "number");
    assert.equal(alert.seq, local.lastSeq);
    assert.equal(alert.data.question_id, question.question_id);
    assert.equal(alert.data.stage, "IMMEDIATE");
    assert.equal(alert.data.vibration, "strong");

    const online = next(traveller, "user_online");
    const room = await local.request("join_question", { question_id: question.question_id });
    assert.deepEqual(room.answers, []);
    assert.equal((await online).data.user_id, "local1");

    const newAnswer = next(traveller, "new_answer");
    const notified = next(traveller, "answer_notification");
    const { answer } = await local.request("create_answer", {
      question_id: question.question_id,
      content: "Try Dombedon, open till 2am.",
    });
    assert.equal(answer.author_local, true);
    assert.equal((await newAnswer).data.answer.answer_id, answer.answer_id);
    const notification = await notified;
    assert.equal(notification.seq, traveller.lastSeq);
    assert.equal(notification.data.answer.content, "Try Dombedon, open till 2am.");

    const accepted = next(local, "answer_accepted_notification");
    const closed = next(local, "question_closed");
    const done = await traveller.request("accept_answer", {
      question_id: question.question_id,
      answer_id: answer.answer_id,
    });
    assert.equal(done.question.status, "resolved");
    assert.equal(done.answer.accepted, true);
    const points = await accepted;
    assert.equal(points.data.points, 10);
    assert.equal(points.data.total_points, 10);
    assert.equal((await closed).data.reason, "accepted");
    assert.equal((await local.request("get_profile")).user.points, 10);
    assert.equal((await traveller.request("ping")).server_time > 0, true);
  } finally {
    await Promise.all([traveller.close(), local.close()]);
  }
});

test("refusals reject with RequestError carrying the documented code; closing ends everything", async () => {
  const session = open(server.url, mint("careful"));
  await session.opened;
  await assert.rejects(session.request("get_question", { question_id: "q-no-such" }), (error) => {
    assert.ok(error instanceof RequestError);
    assert.equal(error.code, "not_found");
    return true;
  });
  await assert.rejects(session.request("create_question", { title: "   ", location: JEJU }), {
    name: "RequestError",
    code: "invalid_field",
  });
  await assert.rejects(session.request("create_question", { title: "x".repeat(201), location: JEJU }), (error) => {
    assert.equal(error.code, "too_long");
    assert.equal(error.field, "title");
    assert.equal(error.error.max, 200);
    return true;
  });
  await assert.rejects(session.request("leave_question", { question_id: "q-no-such" }), { code: "not_found" });
  // A request over maxRequestBytes is refused here (the server would close the connection: 1009).
  await assert.rejects(session.request("create_question", { title: "Tags", location: JEJU, hashtags: ["x".repeat(70000)] }), (error) => {
    assert.ok(error instanceof RequestTooLarge);
    assert.ok(error.bytes > 65536);
    assert.equal(error.max, 65536);
    return true;
  });
  assert.equal(session.state, "open");
  assert.ok((await session.request("ping")).server_time > 0);
  // A request in flight when the session is closed, and one after, reject with SessionClosed.
  const inFlight = session.request("get_profile");
  const closing = session.close();
  await assert.rejects(inFlight, SessionClosed);
  await closing;
  assert.equal(session.state, "closed");
  await assert.rejects(session.request("ping"), SessionClosed);
  assert.ok(!(session.closed instanceof ConnectionLost));
});
