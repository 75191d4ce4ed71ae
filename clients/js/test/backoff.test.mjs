// Timing with an injected clock and random source: backoff delays, maxAttempts,
// `online`, and the ping after silence. Real sockets; only time is fake.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, before, test } from "node:test";
import { ConnectionLost, SessionClosed, backoffDelay } from "../dist/index.js";
import { FakeClock, JEJU, Relay, Server, mint, next, open, until } from "./helpers.mjs";

let server;
before(async () => {
  // The location re-sent after a reconnect is never rate-limited here, whether or not the
  // server remembers the update before the drop (it forgets it with the user's last connection).
  server = await Server.start("[location]\nmin_update_interval_s = 0.05\n");
});
after(async () => {
  await server?.stop();
});

/** A port where nothing listens. */
async function deadPort() {
  const listener = createServer();
  await new Promise((resolve) => listener.listen(0, "127.0.0.1", resolve));
  const { port } = listener.address();
  await new Promise((resolve) => listener.close(resolve));
  return port;
}

test("backoffDelay is full jitter over a capped exponential", () => {
  const options = { base: 1000, factor: 2, max: 16000 };
  assert.deepEqual(
    [1, 2, 3, 4, 5, 6, 7].map((n) => backoffDelay(n, options, () => 0.5)),
    [500, 1000, 2000, 4000, 8000, 8000, 8000],
  );
  assert.equal(backoffDelay(1, {}, () => 0.999), 999);
  assert.equal(backoffDelay(3, { jitter: "none" }), 4000);
  assert.equal(backoffDelay(5000, {}, () => 1), 16000); // huge attempt counts stay finite
});

test("a URL the WebSocket refuses ends the session at once", async () => {
  const session = open("http//not-a-url", mint("nobody"));
  await assert.rejects(session.opened, (error) => error instanceof SessionClosed && /Invalid URL/.test(error.message));
  assert.equal(session.state, "closed");
});

test("each failed attempt waits random * min(max, base * factor^(n-1)); maxAttempts ends the session", async () => {
  const clock = new FakeClock();
  const randoms = [0.5, 0.25, 0.75];
  const url = `ws://127.0.0.1:${await deadPort()}/`;
  const session = open(url, mint("nobody"), {
    clock,
    random: () => randoms.shift(),
    backoff: { base: 1000, factor: 2, max: 3000 },
    maxAttempts: 4,
  });
  const waits = [];
  for (let attempt = 1; attempt <= 3; attempt++) {
    await next(session, "disconnected");
    assert.equal(session.state, "connecting");
    waits.push(...clock.pending());
    clock.advance(clock.pending()[0]);
  }
  assert.deepEqual(waits, [500, 500, 2250]); // 0.5 * 1000, 0.25 * 2000, 0.75 * min(3000, 4000)
  const closed = await next(session, "closed");
  assert.ok(closed instanceof SessionClosed);
  assert.match(closed.message, /4 failed attempts in a row/);
  assert.equal(session.state, "closed");
  await assert.rejects(session.opened, SessionClosed);
  assert.deepEqual(clock.pending(), []); // nothing left behind
});

test("`online` retries at once; silence brings a ping, and no reply to it a reconnection", async () => {
  const clock = new FakeClock();
  const network = new EventTarget();
  const relay = await Relay.start(await deadPort()); // the network is down: every attempt fails
  const session = open(relay.url, mint("pinger", { local: true }), { clock, random: () => 0.5, network, pingAfter: 20000, pingTimeout: 10000 });
  const probe = open(server.url, mint("probe"));
  const localsNearby = async () => (await probe.request("nearby_locals", { location: JEJU })).within_2km;
  try {
    await next(session, "disconnected");
    assert.deepEqual(clock.pending(), [500]); // waiting to retry
    relay.target = server.port; // the network comes back, and the browser says so
    network.dispatchEvent(new Event("online"));
    await session.opened; // without the clock moving
    assert.deepEqual(clock.pending(), [20000]); // only the silence timer
    assert.equal((await session.request("update_location", { location: JEJU })).live, true);
    assert.equal(await localsNearby(), 1);

    // Silence: a ping goes out, the reply comes, and all is well.
    clock.advance(20000);
    assert.deepEqual(clock.pending(), [10000, 20000]);
    await until(() => clock.pending().length === 1);
    assert.deepEqual(clock.pending(), [20000]);
    assert.equal(session.state, "open");

    // The connection goes quiet (nothing passes from the server any more): the ping goes unanswered.
    relay.hold();
    clock.advance(20000);
    const dropped = next(session, "disconnected");
    clock.advance(10000);
    assert.deepEqual(await dropped, { code: 1006, reason: "no reply to ping", wasOpen: true });
    assert.equal(session.state, "reconnecting");
    await until(async () => (await localsNearby()) === 0); // the server saw the connection go
    assert.deepEqual(clock.pending(), [500]);
    // Requests made meanwhile wait for the connection (at most their timeout), then go once.
    const waiting = session.request("get_profile");
    const impatient = session.request("ping", {}, { timeout: 100 });
    clock.advance(100);
    await assert.rejects(impatient, (error) => error instanceof ConnectionLost && /not sent/.test(error.message));
    relay.release();
    const hello = next(session, "hello");
    clock.advance(400);
    assert.equal((await hello).resumed, true);
    assert.equal((await waiting).user.user_id, "pinger");
    assert.equal(session.state, "open");
    assert.equal(session.reconnects, 1);
    await until(async () => (await localsNearby()) === 1); // the location was re-sent
    assert.deepEqual(session.location, { location: JEJU });
  } finally {
    await Promise.all([session.close(), probe.close()]);
    await relay.close();
  }
});
