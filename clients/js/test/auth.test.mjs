// Close codes that end or refresh a session: 4001 (a new token, once), 4003 (banned), 4008 at hello
// (the per-user connection cap: retried, as the cap frees).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { SessionClosed } from "../dist/index.js";
import { Server, mint, next, open, until } from "./helpers.mjs";

let server;
before(async () => {
  server = await Server.start();
});
after(async () => {
  await server?.stop();
});

test("4001: getToken() is called again once, and the fresh token works", async () => {
  const tokens = [mint("refresher", {}, { ttlS: -60 }), mint("refresher")];
  let calls = 0;
  const session = open(server.url, () => tokens[calls++]);
  const drops = [];
  session.on("disconnected", (d) => drops.push(d.code));
  try {
    const hello = await session.opened;
    assert.equal(hello.user.user_id, "refresher");
    assert.equal(calls, 2);
    assert.deepEqual(drops, [4001]);
    assert.equal((await session.request("ping")).server_time > 0, true);
  } finally {
    await session.close();
  }
});

test("4001 twice in a row: SessionClosed(4001), no more attempts", async () => {
  let calls = 0;
  const session = open(server.url, () => {
    calls++;
    return mint("expired", {}, { ttlS: -60 });
  });
  const error = await session.opened.then(
    () => assert.fail("opened"),
    (e) => e,
  );
  assert.ok(error instanceof SessionClosed);
  assert.equal(error.code, 4001);
  assert.equal(typeof error.reason, "string");
  assert.equal(calls, 2);
  assert.equal(session.state, "closed");
  assert.equal(session.closed.code, 4001);
  await assert.rejects(session.request("get_profile"), { name: "SessionClosed", code: 4001 });
  await session.close();
});

test("4003: a user banned by an admin gets SessionClosed(4003) and the session closes", async () => {
  const admin = open(server.url, mint("ops", { role: "admin" }));
  const mallory = open(server.url, mint("mallory"));
  try {
    await Promise.all([admin.opened, mallory.opened]);
    const states = [];
    mallory.on("state", (s) => states.push(s));
    const closed = next(mallory, "closed");
    const pending = mallory.request("ping", {}, { timeout: 60000 });
    const banned = await admin.request("ban_user", { user_id: "mallory", reason: "selling casino links" });
    assert.equal(banned.user_id, "mallory");
    const error = await closed;
    assert.ok(error instanceof SessionClosed);
    assert.equal(error.code, 4003);
    assert.match(error.reason, /casino/);
    assert.equal(mallory.state, "closed");
    assert.deepEqual(states, ["closed"]);
    // The ping was answered before the ban, or rejected with the ban: never left hanging.
    await pending.catch((e) => assert.equal(e.code, 4003));
    await assert.rejects(mallory.request("ping"), { name: "SessionClosed", code: 4003 });
  } finally {
    await Promise.all([admin.close(), mallory.close()]);
  }
});

test("4008 at hello (the per-user connection cap) is retried with backoff until a connection frees", async () => {
  const capped = await Server.start("[limits]\nconnections_per_user = 1\n");
  const laptop = open(capped.url, mint("capped"));
  let phone;
  try {
    await laptop.opened;
    phone = open(capped.url, mint("capped"), { backoff: { base: 20, max: 100 } });
    const drops = [];
    phone.on("disconnected", (d) => drops.push(d.code));
    await until(() => drops.length >= 2);
    assert.ok(drops.every((code) => code === 4008), `dropped with ${drops}`);
    assert.equal(phone.state, "connecting");
    assert.equal(phone.closed, null);
    await laptop.close();
    const hello = await phone.opened;
    assert.equal(hello.user.user_id, "capped");
  } finally {
    await Promise.all([laptop.close(), phone?.close()]);
    await capped.stop();
  }
});
