/**
 * A session: one WebSocket to dongne that comes back.
 *
 * Theory of operation. At most one socket exists at a time (`#ws`); every
 * callback of a socket first checks that it is still the current one, so a
 * stale socket (dropped, timed out, replaced) can never touch the session.
 * Each socket says `hello` (with `resume: {last_seq}` once the session has a
 * seq to resume from), then the session re-joins its rooms and re-sends its
 * last location, and only then is it "open" and sends the requests that were
 * waiting. When a socket ends, the requests sent on it reject with
 * `ConnectionLost` (never re-sent), and the session reconnects after a
 * backoff, or ends with `SessionClosed` when the close code says that
 * reconnecting cannot help. Durable events (those with `seq`) are delivered
 * once each, in order: anything at or below the last delivered seq is dropped,
 * and a gap makes the session reconnect to let the resume fill it.
 */

import { backoffDelay, type BackoffOptions } from "./backoff.js";
import { decodeFrame, encodeRequest, isMap, type Event as WireEvent, type Json, type Reply } from "./codec.js";
import { Emitter } from "./emitter.js";
import { ConnectionLost, RequestError, RequestTimeout, RequestTooLarge, SessionClosed } from "./errors.js";
import type { EventType, HelloReply, Location, Operation, ReplyData, RequestData, ServerEvent, User } from "./protocol.js";

export type SessionState = "connecting" | "open" | "reconnecting" | "closed";

/** The parts of the WebSocket interface the session uses (browsers', React Native's, Node's `ws`). */
export interface WebSocketLike {
  binaryType: string;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  // A method, not a property: the DOM's listener types then fit.
  addEventListener(type: "open" | "message" | "close" | "error", listener: (event: any) => void): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** Timers, injectable for tests. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/**
 * Where the last delivered seq is kept across page reloads: AsyncStorage fits as it is; in a
 * browser, `{ get: (k) => localStorage.getItem(k), set: (k, v) => localStorage.setItem(k, v) }`
 * (a `Storage` has `getItem`/`setItem`, not `get`/`set`).
 */
export interface SeqStorage {
  get(key: string): string | null | undefined | Promise<string | null | undefined>;
  set(key: string, value: string): void | Promise<void>;
}

/** Something that fires `online` and `offline` (in browsers, `window`). */
export interface NetworkEvents {
  addEventListener(type: "online" | "offline", listener: () => void): void;
  removeEventListener(type: "online" | "offline", listener: () => void): void;
}

export interface ConnectOptions {
  /** A token (a JWT from the app's backend); called for each connection, and again after a 4001. */
  getToken: () => string | Promise<string>;
  /** The WebSocket constructor (default: the global one; in Node, pass `ws`'s). */
  WebSocket?: WebSocketConstructor;
  /** Keeps the last delivered seq per user and server, so a reload resumes where it stopped. */
  storage?: SeqStorage | null;
  backoff?: BackoffOptions;
  /** Failed connection attempts in a row before the session gives up; `null` (default): never. */
  maxAttempts?: number | null;
  /** Connecting (socket open + hello) and requests (waiting for a connection + the reply), ms. Default 10000. */
  timeout?: number;
  /**
   * The largest request frame sent, bytes (the server's `max_frame_bytes`; default 65536). A larger
   * request rejects with `RequestTooLarge` and is not sent: the server would close the connection (1009).
   */
  maxRequestBytes?: number;
  /** Send a `ping` after this long without a frame from the server, ms. Default 20000. */
  pingAfter?: number;
  /** Reconnect when nothing comes this long after a `ping`, ms. Default 10000. */
  pingTimeout?: number;
  clock?: Clock;
  /** Uniform in [0, 1): the backoff's jitter. Default `Math.random`. */
  random?: () => number;
  /** Source of `online`/`offline` (default: `globalThis` when it has `addEventListener`; `null`: none). */
  network?: NetworkEvents | null;
}

export interface RequestOptions {
  /** Overrides the session's `timeout` for this request, ms. */
  timeout?: number;
}

/** Why a connection (or an attempt at one) ended. */
export interface Disconnected {
  /** The close code; 1006 for a drop, including the session's own (no ping reply, a seq gap, a connect timeout). */
  code: number;
  reason: string;
  /** Whether that connection had completed its `hello`. */
  wasOpen: boolean;
}

/** The session's own events, beside the server's. */
export interface SessionEvents {
  state: SessionState;
  /** Each successful hello (the first connection and every reconnection). */
  hello: HelloReply;
  /** A room re-joined after a reconnect: refresh what you show of it (live events were missed). */
  rejoined: ReplyData<"join_question">;
  /**
   * A room was not re-joined after a reconnect, for good (the question was deleted or hidden meanwhile,
   * or re-joins were refused five times): show it as gone, or load it again to see why.
   */
  rejoin_failed: { question_id: string; error: RequestError };
  /** The server no longer kept durable events `from`..`to` (a resume with `resumed: false`): they are lost. */
  missed: { from: number; to: number };
  disconnected: Disconnected;
  /** The session ended (also `state` "closed"). */
  closed: SessionClosed;
  /** Every server event, whatever its type (also types this version does not know). */
  event: ServerEvent;
  /**
   * `storage` failed. A failed `get` (reading the seq to resume from) is not taken for "nothing
   * stored", which would skip the events sent meanwhile: the attempt counts as failed and the
   * next one reads again. A failed `set`: the next reload may resume from an older seq (events
   * already delivered then come again; the server's replay, not the handlers, sees them twice).
   */
  storage_error: { operation: "get" | "set"; error: unknown };
  /**
   * The token's subject changed (`getToken()` returned another user's token): the rooms and
   * location belonged to the previous user and were forgotten; the seq is the new user's own.
   */
  user_changed: { from: string; to: string };
}

export type SessionEventMap = { [K in EventType]: ServerEvent<K> } & SessionEvents;

type RequestArgs<K extends Operation> = {} extends RequestData<K>
  ? [data?: RequestData<K>, options?: RequestOptions]
  : [data: RequestData<K>, options?: RequestOptions];

interface Call {
  op: string;
  data: Json;
  /** A join's place among its room's joins and leaves: its reply adds the room only if no leave came after. */
  intent?: number;
  resolve: (data: Json) => void;
  reject: (error: Error) => void;
  timer: unknown;
}

/**
 * Close codes after which reconnecting cannot help (PROTOCOL.md: "fix the client", "do not retry", "back off;
 * fix the client"). 4008 only after `hello` (a flood): at `hello` it is the per-user connection cap, which
 * frees when one of the user's other connections ends (a dead one the server has not noticed yet, say).
 */
const FATAL = new Set([1002, 1003, 1007, 1008, 1009, 1010, 4002, 4003]);
const MAX_ID = Number.MAX_SAFE_INTEGER;

const defaultClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

function noop(): void {}

/**
 * Open a session: connect at once, and keep reconnecting until `close()` or a
 * fatal close. Requests made while it is not open wait for the connection (at
 * most `timeout`) and are then sent once; they are never replayed.
 */
export function connect(url: string, options: ConnectOptions): Session {
  return new Session(url, options);
}

export class Session {
  /** Resolves with the first hello's reply; rejects with `SessionClosed` if the session ends before. */
  readonly opened: Promise<HelloReply>;
  /** The latest hello reply (`null` before the first). */
  hello: HelloReply | null = null;
  /** Why the session ended (`null` while it is alive). */
  closed: SessionClosed | null = null;
  /** Successful reconnections so far. */
  reconnects = 0;

  readonly #url: string;
  readonly #options: ConnectOptions;
  readonly #WebSocket: WebSocketConstructor;
  readonly #clock: Clock;
  readonly #emitter = new Emitter<SessionEventMap>();
  #state: SessionState = "connecting";
  #resolveOpened!: (hello: HelloReply) => void;
  #rejectOpened!: (error: SessionClosed) => void;

  #ws: WebSocketLike | null = null;
  #helloDone = false; // on #ws
  #isOpen = false; // #ws said hello and restored rooms and location
  #restoreAt: { ws: WebSocketLike; seq: number } | null = null; // restore #ws once this seq is delivered
  #socketClosed: Promise<void> = Promise.resolve();
  #nextId = 1;
  #sent = new Map<number, Call>(); // on #ws, awaiting their reply
  #waiting = new Set<Call>(); // not sent yet: waiting for the session to open

  #userId: string | null = null;
  #seqLoaded = false; // #lastSeq is #userId's (read from storage, or none stored)
  #lastSeq = 0;
  #resume = false; // whether the next hello resumes from #lastSeq
  #rooms = new Set<string>();
  #roomIntents = new Map<string, number>(); // room -> the number of its latest join or leave
  #intentsMade = 0;
  #location: Json | null = null;

  #lastFrameAt = 0;
  #failed = 0; // failed attempts in a row
  #retries = 0; // retries since the last hello: the n-th waits up to base * factor^(n-1)
  #authRetried = false; // the last connection ended with 4001 and a new token is being tried
  #timers = new Map<"retry" | "connect" | "silence" | "ping" | "location", unknown>();
  #rejoinTimers = new Set<unknown>(); // at most one: the queue's next re-join
  #rejoinQueue: { qid: string; tries: number }[] = []; // re-joins refused for now, sent one at a time
  #rejoinPaceMs = 0; // the last such refusal's retry_after_ms
  #unsubscribe: (() => void)[] = [];
  #storageWrite: Promise<void> | null = null;
  #storageDue = new Map<string, number>(); // seqs to write, by key, in the order first due

  constructor(url: string, options: ConnectOptions) {
    const WebSocketImpl = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (WebSocketImpl === undefined) throw new TypeError("no WebSocket here: pass options.WebSocket (in Node, ws's)");
    this.#url = url;
    this.#options = options;
    this.#WebSocket = WebSocketImpl;
    this.#clock = options.clock ?? defaultClock;
    const storage = options.storage;
    if (storage != null && (typeof storage.get !== "function" || typeof storage.set !== "function")) {
      // A mistake, not a failure: e.g. a DOM Storage, whose methods are getItem/setItem.
      throw new TypeError("options.storage needs get(key) and set(key, value) (for localStorage: { get: (k) => localStorage.getItem(k), set: (k, v) => localStorage.setItem(k, v) })");
    }
    this.opened = new Promise<HelloReply>((resolve, reject) => {
      this.#resolveOpened = resolve;
      this.#rejectOpened = reject;
    });
    this.opened.catch(noop); // an app that never awaits it gets no unhandled rejection
    const network =
      options.network !== undefined
        ? options.network
        : typeof (globalThis as Partial<NetworkEvents>).addEventListener === "function"
          ? (globalThis as unknown as NetworkEvents)
          : null;
    if (network !== null) {
      const online = (): void => this.#online();
      const offline = (): void => this.#checkLiveness();
      network.addEventListener("online", online);
      network.addEventListener("offline", offline);
      this.#unsubscribe.push(() => {
        network.removeEventListener("online", online);
        network.removeEventListener("offline", offline);
      });
    }
    void this.#attempt();
  }

  // ---- public ----------------------------------------------------------------

  get state(): SessionState {
    return this.#state;
  }

  /** The last durable seq delivered to handlers. */
  get lastSeq(): number {
    return this.#lastSeq;
  }

  /** The user of the latest hello. */
  get user(): User | null {
    return this.hello?.user ?? null;
  }

  /** The questions whose rooms this session is in (re-joined after a reconnect). */
  get rooms(): readonly string[] {
    return [...this.#rooms];
  }

  /** The last `update_location` data sent (re-sent after a reconnect). */
  get location(): { location: Location; accuracy_m?: number } | null {
    return this.#location as { location: Location; accuracy_m?: number } | null;
  }

  /**
   * Send a request and resolve with its reply's data. Waits for the session to
   * be open (at most `timeout`), then sends it once.
   *
   * Rejects with `RequestError` (the server refused it), `ConnectionLost` (the
   * connection dropped before the reply: applied or not, unknown; or no
   * connection within `timeout`: not sent), `RequestTimeout` (sent, no reply
   * within `timeout`), `SessionClosed` (the session is over).
   */
  request<K extends Operation>(op: K, ...[data, options]: RequestArgs<K>): Promise<ReplyData<K>> {
    // A copy: the location is re-sent after a reconnect, as it was when sent.
    const copy = op === "update_location" ? (JSON.parse(JSON.stringify(data)) as Json) : ((data ?? {}) as Json);
    const call = this.#call(op, copy, options?.timeout ?? this.#options.timeout ?? 10000);
    // Leaving is the app's intent whatever becomes of the request (lost, timed out): the room is not
    // re-joined after a reconnect. A leave twice is harmless.
    if (op === "leave_question") {
      this.#rooms.delete(String(copy.question_id));
      this.#roomIntent(String(copy.question_id));
    }
    if (this.#isOpen && this.#ws !== null) this.#send(this.#ws, call);
    else if (this.closed === null) this.#waiting.add(call);
    return call.promise as Promise<ReplyData<K>>;
  }

  /**
   * Subscribe to a server event (`ev` = `{type, seq?, data}`) or one of the
   * session's own (`state`, `hello`, `rejoined`, `missed`, `disconnected`,
   * `closed`, `event`). Returns the unsubscribe.
   */
  on<K extends keyof SessionEventMap>(type: K, handler: (value: SessionEventMap[K]) => void): () => void {
    return this.#emitter.on(type, handler);
  }

  /** End the session: close the socket politely and stop reconnecting. Idempotent. */
  async close(): Promise<void> {
    const closing = this.#socketClosed;
    this.#finish(new SessionClosed("the session was closed"));
    let timer: unknown;
    await Promise.race([
      closing,
      new Promise<void>((resolve) => (timer = this.#clock.setTimeout(resolve, this.#options.timeout ?? 10000))),
    ]);
    this.#clock.clearTimeout(timer);
    while (this.#storageWrite !== null) await this.#storageWrite;
  }

  // ---- connecting -------------------------------------------------------------

  async #attempt(): Promise<void> {
    this.#timers.delete("retry");
    let token: string;
    try {
      token = await this.#options.getToken();
      if (typeof token !== "string") throw new TypeError(`getToken() returned ${typeof token}, not a string`);
    } catch (error) {
      if (this.closed === null) this.#ended(null, 1006, `getToken() failed: ${String(error)}`, false);
      return;
    }
    if (this.closed !== null) return;
    const subject = subjectOf(token) ?? this.#userId;
    if (subject !== this.#userId || !this.#seqLoaded) {
      // Another user (or the first connection): only that user's own seq may be resumed.
      let stored: number | null;
      try {
        stored = await this.#loadSeq(subject);
      } catch (error) {
        // Not "nothing stored": that would start afresh and skip what was sent meanwhile.
        // #userId stays as it was, so the next attempt reads again.
        if (this.closed !== null) return;
        this.#emitter.emit("storage_error", { operation: "get", error });
        this.#ended(null, 1006, `storage.get() failed: ${String(error)}`, false);
        return;
      }
      if (this.closed !== null) return;
      const previous = this.#userId;
      this.#userId = subject;
      this.#seqLoaded = true;
      this.#resume = stored !== null;
      this.#lastSeq = stored ?? 0;
      if (previous !== null && subject !== null && previous !== subject) {
        // The rooms and the location were the other user's: never join or send them as this one.
        this.#rooms.clear();
        this.#location = null;
        this.#restoreAt = null;
        this.#emitter.emit("user_changed", { from: previous, to: subject });
      }
    }
    let ws: WebSocketLike;
    try {
      ws = new this.#WebSocket(this.#url);
      ws.binaryType = "arraybuffer";
    } catch (error) {
      // A URL the WebSocket refuses (not ws: or wss:, malformed) never gets better.
      this.#finish(new SessionClosed(`cannot open a WebSocket to ${this.#url}: ${String(error)}`));
      return;
    }
    this.#ws = ws;
    this.#helloDone = false;
    this.#socketClosed = new Promise((resolve) => ws.addEventListener("close", () => resolve()));
    this.#setTimer("connect", this.#options.timeout ?? 10000, () => this.#drop(ws, "timed out connecting"));
    ws.addEventListener("open", () => {
      if (ws === this.#ws) this.#hello(ws, token);
    });
    ws.addEventListener("message", (event: { data: unknown }) => {
      if (ws === this.#ws) this.#receive(ws, event.data);
    });
    ws.addEventListener("close", (event: { code?: number; reason?: string }) => {
      if (ws === this.#ws) this.#ended(ws, event.code ?? 1006, event.reason ?? "", this.#helloDone);
    });
    ws.addEventListener("error", noop); // a close event follows
  }

  #hello(ws: WebSocketLike, token: string): void {
    const data: Json = { token };
    if (this.#resume) data.resume = { last_seq: this.#lastSeq };
    this.#internal(ws, "hello", data, (reply) => this.#helloed(ws, reply as unknown as HelloReply, "resume" in data), (error) => {
      if (error instanceof RequestError) this.#finish(new SessionClosed(`hello was refused: ${error.message}`));
    });
  }

  /**
   * Send a request of the session's own on `ws`. Its outcome is handled at once,
   * in wire order (a promise's callback would run only after the frames that
   * arrived with the reply, e.g. a replay behind a hello).
   */
  #internal(ws: WebSocketLike, op: string, data: Json, ok: (data: Json) => void, failed: (error: Error) => void = noop): void {
    this.#send(ws, {
      op,
      data,
      timer: undefined,
      resolve: (reply) => {
        if (ws === this.#ws) ok(reply);
      },
      reject: (error) => {
        if (ws === this.#ws) failed(error);
      },
    });
  }

  #helloed(ws: WebSocketLike, hello: HelloReply, resumed: boolean): void {
    if (ws !== this.#ws) return;
    this.#clearTimer("connect");
    this.#helloDone = true;
    this.#failed = 0;
    this.#retries = 0;
    this.#authRetried = false;
    this.hello = hello;
    if (typeof hello.user?.user_id === "string" && hello.user.user_id !== this.#userId) {
      // The token did not say (not a JWT we could read). Another user than the last hello's:
      // its rooms and location are not this one's.
      if (this.#userId !== null) {
        this.#emitter.emit("user_changed", { from: this.#userId, to: hello.user.user_id });
        this.#rooms.clear();
        this.#location = null;
      }
      this.#userId = hello.user.user_id;
    }
    const serverSeq = hello.last_seq;
    if (Number.isSafeInteger(serverSeq)) {
      const oldest = hello.oldest_seq;
      if (!resumed) {
        this.#lastSeq = serverSeq; // a fresh start: events from now on
      } else if (hello.resumed === false && typeof oldest === "number" && oldest - 1 > this.#lastSeq) {
        // The server pruned events after ours: take the gap (waiting cannot fill it) and say so.
        const from = this.#lastSeq + 1;
        this.#lastSeq = Math.min(oldest - 1, serverSeq);
        this.#emitter.emit("missed", { from, to: oldest - 1 });
      } else if (serverSeq < this.#lastSeq) {
        this.#lastSeq = serverSeq; // the server's store went back (restored): follow it
      }
      this.#resume = true;
      this.#saveSeq();
    }
    this.#lastFrameAt = this.#clock.now();
    this.#armSilence(ws);
    this.#emitter.emit("hello", hello);
    // Re-join after the replay: the server holds live frames back while it replays, and
    // counts them against the slow-consumer bound, so a big join reply (a room's answers)
    // arriving then could close the connection with 4009 before anything was replayed.
    if (resumed && Number.isSafeInteger(serverSeq) && this.#lastSeq < serverSeq) {
      this.#restoreAt = { ws, seq: serverSeq };
    } else {
      this.#restore(ws);
    }
  }

  /** Re-join the rooms and re-send the location, then open. */
  #restore(ws: WebSocketLike): void {
    let joining = this.#rooms.size + 1;
    const joined = (): void => {
      if (--joining > 0 || ws !== this.#ws) return;
      this.#isOpen = true;
      if (this.#state !== "connecting") this.reconnects++;
      this.#setState("open");
      this.#resolveOpened(this.hello!);
      for (const call of this.#waiting) {
        this.#waiting.delete(call);
        this.#send(ws, call);
      }
    };
    for (const qid of this.#rooms) this.#rejoin(ws, qid, 0, joined);
    const location = this.#location;
    if (location !== null) this.#resendLocation(ws, location, 0);
    joined();
  }

  /**
   * Re-join a room. Refused for good (not_found, forbidden, ...): forgotten. Refused for now
   * (rate_limited, unavailable): queued, without holding the session back (`done` is called once,
   * after the first answer).
   */
  #rejoin(ws: WebSocketLike, qid: string, tries: number, done: () => void): void {
    if (ws !== this.#ws || !this.#rooms.has(qid)) {
      done();
      this.#drainRejoins(ws); // a queued room forgotten meanwhile: the next one
      return;
    }
    this.#internal(
      ws,
      "join_question",
      { question_id: qid },
      (reply) => {
        this.#emitter.emit("rejoined", reply as unknown as ReplyData<"join_question">);
        done();
        this.#drainRejoins(ws);
      },
      (error) => {
        if (!(error instanceof RequestError)) return; // the connection ended: the next one re-joins
        if (error.code === "rate_limited" || error.code === "unavailable") {
          if (tries < 5) {
            this.#rejoinPaceMs = error.retryAfterMs ?? 1000 * 2 ** tries;
            this.#rejoinQueue.unshift({ qid, tries: tries + 1 });
          } else {
            this.#rooms.delete(qid); // refused five times over: given up, as one refused for good
            this.#emitter.emit("rejoin_failed", { question_id: qid, error });
          }
        } else {
          this.#rooms.delete(qid); // gone meanwhile, or no longer ours to see
          this.#emitter.emit("rejoin_failed", { question_id: qid, error });
        }
        done();
        this.#drainRejoins(ws);
      },
    );
  }

  /**
   * Send the next queued re-join, `#rejoinPaceMs` after the last answer, one at a time: re-joins
   * refused together and retried together after the same `retry_after_ms` would each be refused
   * again but one, and every refusal counts towards the server's 4008 (30 a minute).
   */
  #drainRejoins(ws: WebSocketLike): void {
    if (ws !== this.#ws || this.#rejoinTimers.size > 0 || this.#rejoinQueue.length === 0) return;
    const handle = this.#clock.setTimeout(() => {
      this.#rejoinTimers.delete(handle);
      const queued = this.#rejoinQueue.shift();
      if (queued !== undefined) this.#rejoin(ws, queued.qid, queued.tries, noop);
    }, this.#rejoinPaceMs);
    this.#rejoinTimers.add(handle);
  }

  /** Re-send a location; a rate-limited one is tried again later, unless a newer one was sent. */
  #resendLocation(ws: WebSocketLike, location: Json, tries: number): void {
    if (ws !== this.#ws || this.#location !== location) return;
    this.#internal(ws, "update_location", location, noop, (error) => {
      if (!(error instanceof RequestError) || this.#location !== location) return;
      if (error.code === "rate_limited" && tries < 3) {
        // The server still counts the update sent before the loss.
        this.#setTimer("location", error.retryAfterMs ?? 1000, () => this.#resendLocation(ws, location, tries + 1));
      } else if (error.code !== "rate_limited" && error.code !== "unknown_op") {
        this.#location = null;
      }
    });
  }

  // ---- frames -----------------------------------------------------------------

  /** A request of the app's: a promise, rejected after `timeout` ms (waiting for a connection included). */
  #call(op: string, data: Json, timeout: number): Call & { promise: Promise<Json> } {
    let resolve!: (data: Json) => void;
    let reject!: (error: Error) => void;
    const promise = new Promise<Json>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const call = { op, data, resolve, reject, timer: undefined as unknown, promise };
    if (this.closed !== null) {
      reject(this.#closedError());
      return call;
    }
    call.timer = this.#clock.setTimeout(() => {
      if (this.#waiting.delete(call)) {
        reject(new ConnectionLost(`no connection within ${timeout} ms; '${op}' was not sent`, false));
      } else {
        for (const [id, sent] of this.#sent) if (sent === call) this.#sent.delete(id);
        reject(new RequestTimeout(`no reply to '${op}' within ${timeout} ms`));
      }
    }, timeout);
    return call;
  }

  #send(ws: WebSocketLike, call: Call): void {
    const id = this.#nextId;
    this.#nextId = id >= MAX_ID ? 1 : id + 1;
    const frame = encodeRequest(call.op, id, call.data);
    const max = this.#options.maxRequestBytes ?? 65536;
    if (frame.byteLength > max) {
      this.#clock.clearTimeout(call.timer);
      call.reject(new RequestTooLarge(`'${call.op}' is ${frame.byteLength} bytes, over ${max}: not sent`, frame.byteLength, max));
      return;
    }
    this.#sent.set(id, call);
    if (call.op === "update_location" && this.#location !== call.data) this.#location = call.data;
    if (call.op === "join_question") call.intent = this.#roomIntent(String(call.data.question_id));
    try {
      ws.send(frame);
    } catch (error) {
      // The socket is closing: its close event rejects the call with ConnectionLost.
    }
  }

  #receive(ws: WebSocketLike, payload: unknown): void {
    this.#clearTimer("ping"); // anything at all proves the connection alive
    this.#lastFrameAt = this.#clock.now();
    if (!(payload instanceof ArrayBuffer) && !ArrayBuffer.isView(payload)) return; // text: not ours
    const frame = decodeFrame(payload);
    if (frame === null) return;
    if (frame.kind === "reply") this.#reply(frame);
    else this.#event(ws, frame);
  }

  #reply(reply: Reply): void {
    const call = reply.id === null ? undefined : this.#sent.get(reply.id);
    if (call === undefined) return; // timed out, or an error about an unreadable frame
    this.#sent.delete(reply.id!);
    this.#clock.clearTimeout(call.timer);
    this.#track(call, reply);
    if (reply.ok) call.resolve(reply.data);
    else call.reject(new RequestError(reply.error));
  }

  /** Number the latest join (when sent) or leave (when asked) of a room. */
  #roomIntent(qid: string): number {
    this.#roomIntents.set(qid, ++this.#intentsMade);
    return this.#intentsMade;
  }

  /** Keep the rooms in step with the replies (re-joined after a reconnect). */
  #track(call: Call, reply: Reply): void {
    const op = call.op;
    // (A connection at its cap of rooms asks without joining the new room: `joined: false`, nothing to re-join.)
    if ((op === "create_question" || op === "join_question") && reply.ok && reply.data.joined !== false) {
      const question = reply.data.question;
      if (isMap(question) && typeof question.question_id === "string") {
        // A join answered after a leave of its room was asked: the room stays left.
        if (call.intent === undefined || this.#roomIntents.get(question.question_id) === call.intent) {
          this.#rooms.add(question.question_id);
        }
      }
    } else if (op === "delete_question" && reply.ok) {
      this.#rooms.delete(String(call.data.question_id));
    }
  }

  #event(ws: WebSocketLike, frame: WireEvent): void {
    const { type, seq, data } = frame;
    if (type === "question_deleted" || (type === "question_closed" && data.reason === "expired")) {
      this.#rooms.delete(String(data.question_id)); // its room is gone: nothing to re-join
    }
    if (seq !== undefined) {
      if (seq <= this.#lastSeq) return; // a replay overlapping what was delivered
      if (seq !== this.#lastSeq + 1) {
        this.#drop(ws, `durable event ${seq} after ${this.#lastSeq}: resuming to fill the gap`);
        return;
      }
      this.#lastSeq = seq;
    }
    const event = (seq === undefined ? { type, data } : { type, seq, data }) as ServerEvent;
    this.#emitter.emit(type as EventType, event as never);
    this.#emitter.emit("event", event);
    if (seq !== undefined) {
      this.#saveSeq();
      const restore = this.#restoreAt;
      if (restore !== null && restore.ws === ws && seq >= restore.seq) {
        this.#restoreAt = null;
        this.#restore(ws); // the replay is complete
      }
    }
  }

  // ---- liveness ---------------------------------------------------------------

  /** Ping after `pingAfter` without a frame (the timer is not re-armed per frame: it looks at the last one when due). */
  #armSilence(ws: WebSocketLike, after = this.#options.pingAfter ?? 20000): void {
    this.#setTimer("silence", after, () => {
      const idle = this.#clock.now() - this.#lastFrameAt;
      const pingAfter = this.#options.pingAfter ?? 20000;
      if (idle < pingAfter) this.#armSilence(ws, pingAfter - idle);
      else this.#ping(ws);
    });
  }

  #ping(ws: WebSocketLike): void {
    if (ws !== this.#ws) return;
    this.#armSilence(ws);
    if (this.#timers.has("ping")) return;
    this.#internal(ws, "ping", {}, noop);
    this.#setTimer("ping", this.#options.pingTimeout ?? 10000, () => this.#drop(ws, "no reply to ping"));
  }

  #checkLiveness(): void {
    if (this.#ws !== null && this.#helloDone) this.#ping(this.#ws);
  }

  #online(): void {
    if (this.#timers.has("retry")) {
      this.#clearTimer("retry");
      void this.#attempt(); // the network is back: do not sit out the backoff
    } else {
      this.#checkLiveness(); // the old socket may have died with the old network
    }
  }

  // ---- endings ----------------------------------------------------------------

  /** Give up on `ws` without waiting for its close handshake. */
  #drop(ws: WebSocketLike, reason: string): void {
    if (ws !== this.#ws) return;
    const helloDone = this.#helloDone;
    this.#detach(ws, 4000, reason);
    this.#ended(null, 1006, reason, helloDone);
  }

  #detach(ws: WebSocketLike, code: number, reason: string): void {
    this.#ws = null;
    this.#isOpen = false;
    this.#helloDone = false;
    try {
      // ws (Node) waits up to 30 s for a dead peer's close frame; terminate() does not.
      const terminate = (ws as { terminate?: () => void }).terminate;
      if (code !== 1000 && typeof terminate === "function") terminate.call(ws);
      else ws.close(code, reason);
    } catch {
      // closing a socket that never opened: nothing to do
    }
  }

  /** A connection (or an attempt) ended with `code`: decide between reconnecting and giving up. */
  #ended(ws: WebSocketLike | null, code: number, reason: string, wasOpen: boolean): void {
    if (ws !== null) {
      if (ws !== this.#ws) return;
      this.#ws = null;
      this.#isOpen = false;
      this.#helloDone = false;
    }
    for (const name of ["connect", "silence", "ping", "location"] as const) this.#clearTimer(name);
    for (const handle of this.#rejoinTimers) this.#clock.clearTimeout(handle);
    this.#rejoinTimers.clear();
    this.#rejoinQueue = []; // the next connection re-joins every room
    const fatal = this.closed ?? this.#verdict(code, reason, wasOpen);
    const lost = [...this.#sent.values()];
    this.#sent.clear();
    for (const call of lost) {
      this.#clock.clearTimeout(call.timer);
      call.reject(
        fatal !== null
          ? new SessionClosed(fatal.message, fatal.code, fatal.reason)
          : new ConnectionLost(`the connection was lost before the reply to '${call.op}'; it may or may not have been applied`, true),
      );
    }
    this.#emitter.emit("disconnected", { code, reason, wasOpen });
    if (this.closed !== null) return;
    if (fatal !== null) {
      this.#finish(fatal);
      return;
    }
    this.#setState(this.hello === null ? "connecting" : "reconnecting");
    // After a 4001, a fresh token at once; otherwise a backoff.
    const delay = code === 4001 ? 0 : backoffDelay(++this.#retries, this.#options.backoff, this.#options.random);
    this.#setTimer("retry", delay, () => void this.#attempt());
  }

  /** Whether a connection that ended with `code` ends the session (and why), counting failed attempts. */
  #verdict(code: number, reason: string, wasOpen: boolean): SessionClosed | null {
    if (FATAL.has(code) || (code === 4008 && wasOpen)) {
      return new SessionClosed(`the server closed the connection with ${code} (${reason}); not reconnecting`, code, reason);
    }
    if (code === 4001) {
      if (this.#authRetried) return new SessionClosed(`the server refused the token again (4001: ${reason})`, code, reason);
      this.#authRetried = true; // once: getToken() again
      return null;
    }
    this.#failed = wasOpen ? 0 : this.#failed + 1;
    const max = this.#options.maxAttempts ?? null;
    if (max === null || this.#failed < max) return null;
    const what = this.#failed === 0 ? "the connection was lost and maxAttempts is 0" : `${this.#failed} failed attempts in a row`;
    return new SessionClosed(`could not connect to ${this.#url}: ${what} (last: ${code} ${reason})`, code, reason);
  }

  #finish(error: SessionClosed): void {
    if (this.closed !== null) return;
    this.closed = error;
    for (const name of [...this.#timers.keys()]) this.#clearTimer(name);
    for (const handle of this.#rejoinTimers) this.#clock.clearTimeout(handle);
    this.#rejoinTimers.clear();
    this.#rejoinQueue = []; // the next connection re-joins every room
    for (const off of this.#unsubscribe.splice(0)) off();
    const ws = this.#ws;
    if (ws !== null) {
      this.#ended(ws, 1000, "", this.#helloDone); // rejects what was sent with SessionClosed
      this.#detach(ws, 1000, "");
    }
    for (const call of this.#waiting) {
      this.#clock.clearTimeout(call.timer);
      call.reject(this.#closedError());
    }
    this.#waiting.clear();
    this.#rejectOpened(error);
    this.#setState("closed");
    this.#emitter.emit("closed", error);
  }

  #closedError(): SessionClosed {
    const closed = this.closed!;
    return new SessionClosed(closed.message, closed.code, closed.reason);
  }

  // ---- little helpers ----------------------------------------------------------

  #setState(state: SessionState): void {
    if (state === this.#state) return;
    this.#state = state;
    this.#emitter.emit("state", state);
  }

  #setTimer(name: "retry" | "connect" | "silence" | "ping" | "location", ms: number, fn: () => void): void {
    this.#clearTimer(name);
    const handle = this.#clock.setTimeout(() => {
      if (this.#timers.get(name) === handle) this.#timers.delete(name);
      fn();
    }, ms);
    this.#timers.set(name, handle);
  }

  #clearTimer(name: "retry" | "connect" | "silence" | "ping" | "location"): void {
    if (!this.#timers.has(name)) return;
    this.#clock.clearTimeout(this.#timers.get(name));
    this.#timers.delete(name);
  }

  #storageKey(userId: string | null = this.#userId): string | null {
    return userId === null ? null : `dongne-client:${this.#url}:${userId}:last_seq`;
  }

  /** The seq stored for `userId` (`null`: none); throws what the storage throws. */
  async #loadSeq(userId: string | null): Promise<number | null> {
    const key = this.#storageKey(userId);
    const storage = this.#options.storage;
    if (key === null || storage == null) return null;
    const stored = await storage.get(key);
    const value = typeof stored === "string" && /^\d+$/.test(stored) ? Number(stored) : NaN;
    return Number.isSafeInteger(value) ? value : null;
  }

  /**
   * Write the last seq; writes do not overlap, and only the newest value per user is written. The
   * key and the value are taken together: a write still in flight when the user changes (a slow,
   * asynchronous storage) neither puts one user's seq under the other's key nor skips either.
   */
  #saveSeq(): void {
    const key = this.#storageKey();
    const storage = this.#options.storage;
    if (key === null || storage == null) return;
    this.#storageDue.set(key, this.#lastSeq);
    if (this.#storageWrite !== null) return;
    this.#storageWrite = (async () => {
      try {
        for (let due = this.#storageDue.entries().next(); !due.done; due = this.#storageDue.entries().next()) {
          const [dueKey, seq] = due.value;
          this.#storageDue.delete(dueKey);
          await storage.set(dueKey, String(seq));
        }
      } catch (error) {
        // A full or refusing storage: the next reload resumes from an older seq (or none).
        this.#emitter.emit("storage_error", { operation: "set", error });
      } finally {
        this.#storageWrite = null;
      }
    })();
  }
}

/** The `sub` claim of a JWT, without verifying it (the server does), or `null`. */
export function subjectOf(token: string): string | null {
  const part = token.split(".")[1];
  if (part === undefined) return null;
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  let bits = 0;
  let value = 0;
  let escaped = "";
  for (const char of part.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "")) {
    const index = alphabet.indexOf(char);
    if (index < 0) return null;
    value = ((value << 6) | index) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      escaped += "%" + ((value >> bits) & 0xff).toString(16).padStart(2, "0");
    }
  }
  try {
    const claims: unknown = JSON.parse(decodeURIComponent(escaped));
    return isMap(claims) && typeof claims.sub === "string" ? claims.sub : null;
  } catch {
    return null;
  }
}
