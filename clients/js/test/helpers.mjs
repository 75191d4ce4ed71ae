// Test helpers: a real `dongne serve` subprocess, tokens, a TCP relay that can be
// cut and re-pointed, a fake clock, and small waits on session events.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";
import { connect } from "../dist/index.js";

export const SECRET = "js-sdk-test-secret-0123456789-0123456789-abcdef";
const LISTENING = /clients (ws:\/\/\S+:\d+)\s+ops (http:\/\/\S+:\d+)/;
export const JEJU = { lat: 33.4996, lng: 126.5312 };

/** An HS256 JWT, as the app's backend would mint it. */
export function mint(sub, claims = {}, { ttlS = 3600 } = {}) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: now + ttlS, iat: now, ...claims })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

/** A `dongne serve` on port 0 in a fresh directory; `restart()` starts another on the same database. */
export class Server {
  constructor(config) {
    this.dir = mkdtempSync(join(tmpdir(), "dongne-js-"));
    this.args = ["-m", "dongne", "serve", "--port", "0", "--ops-port", "0", "--db", join(this.dir, "db.sqlite3")];
    if (config) {
      writeFileSync(join(this.dir, "test.toml"), config);
      this.args.push("--config", join(this.dir, "test.toml"));
    }
    this.log = "";
    this.proc = null;
  }

  static async start(config) {
    const server = new Server(config);
    await server.#spawn();
    return server;
  }

  async #spawn() {
    const proc = spawn(process.env.DONGNE_PYTHON ?? "python3", this.args, {
      cwd: this.dir, // no ./config.toml
      // The server reads every DONGNE_* variable as a setting and refuses unknown ones (such as
      // DONGNE_PYTHON): it gets only those of the test.
      env: {
        ...Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith("DONGNE_"))),
        DONGNE_JWT_SECRET: SECRET,
        DONGNE_SNAPSHOTS_INTERVAL_S: "0",
      },
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.on("exit", resolve));
    this.streamsClosed = new Promise((resolve) => proc.on("close", resolve)); // after exit, its stderr read to the end
    const start = this.log.length;
    this.waiters = [];
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (chunk) => {
      this.log += chunk;
      for (const waiter of [...this.waiters]) waiter();
    });
    const match = await this.waitForLog(LISTENING, start, 30000);
    this.url = match[1];
    this.ops = match[2];
    this.port = Number(new URL(this.url).port);
  }

  /** The first match of `pattern` in the log written after `from`. */
  waitForLog(pattern, from = 0, ms = 20000) {
    return new Promise((resolve, reject) => {
      const check = () => {
        const match = pattern.exec(this.log.slice(from));
        if (match) {
          this.waiters = this.waiters.filter((w) => w !== check);
          clearTimeout(timer);
          resolve(match);
        }
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== check);
        reject(new Error(`no ${pattern} in the server's log within ${ms} ms:\n${this.log.slice(-3000)}`));
      }, ms);
      this.waiters.push(check);
      this.streamsClosed.then(() => {
        check();
        if (this.waiters.includes(check)) {
          this.waiters = this.waiters.filter((w) => w !== check);
          clearTimeout(timer);
          reject(new Error(`the server exited before ${pattern} appeared in its log:\n${this.log.slice(-3000)}`));
        }
      });
      check();
    });
  }

  async kill(signal = "SIGKILL") {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(signal);
    await this.exited;
  }

  async restart() {
    await this.kill("SIGKILL");
    await this.#spawn();
  }

  async stop() {
    await this.kill("SIGTERM");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * A TCP relay on 127.0.0.1 between the SDK and the server: `sever()` destroys
 * every open pair (the SDK sees a dropped connection), `target` re-points new
 * connections, `hold()` stops forwarding the server's bytes to the SDK (as a
 * client that stopped reading), `cutBeforeReply()` lets a request through and
 * severs at its reply.
 */
export class Relay {
  constructor(targetPort) {
    this.target = targetPort;
    this.pairs = new Set();
    this.holding = false;
    this.onUpstream = null;
    this.onDownstream = null;
    this.server = createServer((client) => this.#pair(client));
  }

  static async start(targetPort) {
    const relay = new Relay(targetPort);
    await new Promise((resolve) => relay.server.listen(0, "127.0.0.1", resolve));
    relay.url = `ws://127.0.0.1:${relay.server.address().port}/`;
    return relay;
  }

  #pair(client) {
    const upstream = tcpConnect(this.target, "127.0.0.1");
    const pair = { client, upstream, held: this.holding };
    this.pairs.add(pair);
    const end = () => {
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("data", (chunk) => {
      upstream.write(chunk);
      if (this.onUpstream) {
        const hook = this.onUpstream;
        if (hook(chunk)) this.onUpstream = null;
      }
    });
    if (pair.held) upstream.pause();
    upstream.on("data", (chunk) => {
      if (this.onDownstream) {
        const hook = this.onDownstream;
        this.onDownstream = null;
        if (hook(chunk)) return;
      }
      client.write(chunk);
    });
    client.on("close", end);
    upstream.on("close", end);
    client.on("error", end);
    upstream.on("error", end);
  }

  sever() {
    for (const pair of [...this.pairs]) {
      pair.client.destroy();
      pair.upstream.destroy();
    }
    this.pairs.clear();
  }

  /** Stop reading the server's bytes on open connections (and new ones while holding). */
  hold() {
    this.holding = true;
    for (const pair of this.pairs) {
      pair.held = true;
      pair.upstream.pause();
    }
  }

  release() {
    this.holding = false;
    for (const pair of this.pairs) {
      pair.held = false;
      pair.upstream.resume();
    }
  }

  /**
   * Forward the SDK's next bytes (a request) to the server, then sever at the
   * first bytes back (its reply), which the SDK never gets. Resolves when severed.
   */
  cutBeforeReply() {
    return new Promise((resolve) => {
      this.onUpstream = () => {
        this.onDownstream = () => {
          this.sever();
          resolve();
          return true;
        };
        return true;
      };
    });
  }

  async close() {
    this.sever();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** A session on node's `ws`, with the given token source. */
export function open(url, token, options = {}) {
  return connect(url, {
    getToken: typeof token === "function" ? token : () => token,
    WebSocket,
    network: null,
    ...options,
  });
}

/** The next `type` event of `session` matching `predicate` (within `ms`). */
export function next(session, type, predicate = () => true, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no '${type}' within ${ms} ms`));
    }, ms);
    const off = session.on(type, (value) => {
      if (!predicate(value)) return;
      off();
      clearTimeout(timer);
      resolve(value);
    });
  });
}

/** Timers that run only when told: `advance(ms)` fires those due, in order. */
export class FakeClock {
  constructor(start = 1_800_000_000_000) {
    this.time = start;
    this.timers = new Map();
    this.nextId = 1;
  }

  now() {
    return this.time;
  }

  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.timers.set(id, { fn, at: this.time + ms, ms });
    return id;
  }

  clearTimeout(id) {
    this.timers.delete(id);
  }

  /** The pending timers' delays (ms from when they were set), soonest first. */
  pending() {
    return [...this.timers.values()].sort((a, b) => a.at - b.at).map((t) => t.ms);
  }

  advance(ms) {
    const until = this.time + ms;
    for (;;) {
      const due = [...this.timers.entries()].filter(([, t]) => t.at <= until).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      this.timers.delete(due[0]);
      this.time = due[1].at;
      due[1].fn();
    }
    this.time = until;
  }
}

/** A storage object as localStorage would be, in memory. */
export function memoryStorage() {
  const map = new Map();
  return { map, get: (key) => map.get(key) ?? null, set: (key, value) => void map.set(key, value) };
}

/** Wait `ms` of real time (the tests' rate limits are in real time). */
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolves once `condition()` (maybe async) holds, checking every `every` ms: for state only visible by asking. */
export async function until(condition, ms = 10000, every = 10) {
  const deadline = Date.now() + ms;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`not within ${ms} ms: ${condition}`);
    await sleep(every);
  }
}
