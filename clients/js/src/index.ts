/**
 * dongne-client: the JavaScript/TypeScript SDK for dongne's WebSocket protocol
 * (PROTOCOL.md). Runs in browsers, Node >= 20 (pass `ws` as `WebSocket`) and
 * React Native.
 */

export { connect, Session, subjectOf } from "./session.js";
export type {
  Clock,
  ConnectOptions,
  Disconnected,
  NetworkEvents,
  RequestOptions,
  SeqStorage,
  SessionEventMap,
  SessionEvents,
  SessionState,
  WebSocketConstructor,
  WebSocketLike,
} from "./session.js";
export { ConnectionLost, DongneError, RequestError, RequestTimeout, RequestTooLarge, SessionClosed } from "./errors.js";
export { backoffDelay } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { CloseCode } from "./protocol.js";
export type * from "./protocol.js";
