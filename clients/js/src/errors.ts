/** Errors of a session: refusals, lost connections, ended sessions. */

import type { ErrorCode, WireError } from "./protocol.js";

/** The root of every error this package raises. */
export class DongneError extends Error {
  override name = "DongneError";
}

/** The server refused a request; `code` is the documented error code (PROTOCOL.md, "Error codes"). */
export class RequestError extends DongneError {
  override name = "RequestError";
  readonly code: ErrorCode;
  /** The field at fault (`too_long`, some `invalid_field`), if the server named one. */
  readonly field: string | undefined;
  /** When to try again (`rate_limited`, `unavailable`), in ms. */
  readonly retryAfterMs: number | undefined;
  /** The whole error map as the server sent it (`max` and anything else). */
  readonly error: WireError;

  constructor(error: WireError) {
    super(`${error.code}: ${error.message}`);
    this.code = error.code;
    this.error = error;
    this.field = typeof error.field === "string" ? error.field : undefined;
    this.retryAfterMs = typeof error.retry_after_ms === "number" ? error.retry_after_ms : undefined;
  }
}

/**
 * The connection dropped before the reply arrived, or no connection came back in
 * time to send the request. The request may or may not have been applied (if it
 * was sent); it is never re-sent. Send it again only if doing so twice is
 * harmless, or check first. The session itself goes on reconnecting.
 */
export class ConnectionLost extends DongneError {
  override name = "ConnectionLost";
  /**
   * Whether the request was sent. `false`: it never left (no connection in time), so sending it
   * again is safe. `true`: the connection dropped before its reply, so it may have been applied;
   * check before sending a write again (e.g. `my_questions` after a `create_question`).
   */
  readonly sent: boolean;

  constructor(message: string, sent: boolean) {
    super(message);
    this.sent = sent;
  }
}

/**
 * The request was not sent: its frame would be larger than the server accepts (`maxRequestBytes`,
 * the server's `max_frame_bytes`), which would close the connection with 1009. Shorten it.
 */
export class RequestTooLarge extends DongneError {
  override name = "RequestTooLarge";
  /** The encoded request's size and the limit, in bytes. */
  readonly bytes: number;
  readonly max: number;

  constructor(message: string, bytes: number, max: number) {
    super(message);
    this.bytes = bytes;
    this.max = max;
  }
}

/** No reply within the request's timeout; the connection looked alive. */
export class RequestTimeout extends DongneError {
  override name = "RequestTimeout";
}

/**
 * The session is over and will not reconnect: `close()` was called, the server
 * closed it with a code that reconnecting cannot help (`code`, `reason`), the
 * token was refused twice in a row (4001), or `maxAttempts` attempts in a row failed.
 */
export class SessionClosed extends DongneError {
  override name = "SessionClosed";
  /** The close code that ended it, if the server closed it. */
  readonly code: number | null;
  readonly reason: string | null;

  constructor(message: string, code: number | null = null, reason: string | null = null) {
    super(message);
    this.code = code;
    this.reason = reason;
  }
}
