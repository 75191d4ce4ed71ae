// The one place the app touches the SDK: a session, typed calls and events, errors in words.
import { connect, RequestError, ConnectionLost, RequestTimeout, RequestTooLarge, SessionClosed } from "dongne-client";
import type { SessionEvents, SessionState } from "dongne-client";
import type { Events, Ops } from "./types";

export { RequestError, ConnectionLost, RequestTimeout, RequestTooLarge, SessionClosed };

export type ConnState = SessionState;

/** What the app needs of a session (the SDK's is wider and typed from PROTOCOL.md itself). */
interface SessionLike {
  opened: Promise<unknown>;
  state: ConnState;
  lastSeq: number;
  hello?: unknown;
  request(op: string, data: unknown): Promise<unknown>;
  on(type: string, fn: (ev: { type: string; seq?: number; data: unknown }) => void): () => void;
  close(): Promise<void>;
}

let session: SessionLike | null = null;

export interface SessionOptions {
  getToken: () => Promise<string> | string;
  storage: { get(key: string): string | null; set(key: string, value: string): void };
}

export function openSession(url: string, options: SessionOptions): SessionLike {
  session = connect(url, options) as unknown as SessionLike;
  return session;
}

function current(): SessionLike {
  if (session === null) throw new Error("no session yet");
  return session;
}

/** A request; rejects with RequestError, ConnectionLost or SessionClosed. */
export function call<K extends keyof Ops>(op: K, data: Ops[K][0]): Promise<Ops[K][1]> {
  return current().request(op, data) as Promise<Ops[K][1]>;
}

/** Subscribe to an event; returns the unsubscribe. */
/** The durable events (PROTOCOL.md): the inbox's, each one unread when it comes. */
export const DURABLE_EVENTS = [
  "answer_notification",
  "answer_accepted_notification",
  "new_question_notification",
  "slow_response_alert",
  "content_hidden",
] as const;

export function onEvent<K extends keyof Events>(type: K, fn: (data: Events[K], seq: number | undefined) => void): () => void {
  return current().on(type, (ev) => fn(ev.data as Events[K], ev.seq));
}

export function onState(fn: (state: ConnState) => void): () => void {
  return current().on("state", fn as never);
}

/** Resolves after the first successful hello; rejects with SessionClosed if there never is one. */
export function sessionOpened(): Promise<unknown> {
  return current().opened;
}

export function sessionState(): ConnState {
  return session?.state ?? "connecting";
}

/** The session's own events: each hello, a room re-joined after a reconnect, lost notifications, a dropped connection, the end. */
export function onSession<K extends "hello" | "rejoined" | "rejoin_failed" | "missed" | "disconnected" | "closed" | "user_changed">(type: K, fn: (value: SessionEvents[K]) => void): () => void {
  return current().on(type, fn as never);
}

/** The wire code of a failure: a documented error code, or one of the app's own. */
export function errorCode(err: unknown): string {
  if (err instanceof RequestError) return err.code;
  // Sent, then the connection dropped: it may have been applied (check before sending it again).
  // Not sent: nothing happened, sending it again is safe.
  if (err instanceof ConnectionLost) return err.sent ? "connection_lost" : "not_sent";
  if (err instanceof RequestTimeout) return "request_timeout";
  if (err instanceof RequestTooLarge) return "too_large";
  if (err instanceof SessionClosed) return "session_closed";
  return "unknown";
}

export function retryAfterMs(err: unknown): number | undefined {
  return err instanceof RequestError ? err.retryAfterMs : undefined;
}
