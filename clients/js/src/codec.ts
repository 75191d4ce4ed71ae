/** Frames on the wire: one msgpack map each. `decode` returns `unknown`, narrowed here. */

import { Decoder, Encoder } from "@msgpack/msgpack";
import type { WireError } from "./protocol.js";

const encoder = new Encoder({ ignoreUndefined: true });
// Bounds well above anything the server sends (a frame is at most a room's worth of answers).
const decoder = new Decoder({
  maxStrLength: 1 << 22,
  maxBinLength: 1 << 22,
  maxArrayLength: 1 << 20,
  maxMapLength: 1 << 16,
  maxExtLength: 0,
});

export type Json = Record<string, unknown>;

export interface Reply {
  kind: "reply";
  id: number | null;
  ok: boolean;
  data: Json;
  error: WireError;
}

export interface Event {
  kind: "event";
  type: string;
  seq: number | undefined;
  data: Json;
}

export function encodeRequest(type: string, id: number, data: object): Uint8Array {
  return encoder.encode({ type, id, data });
}

export function isMap(value: unknown): value is Json {
  return typeof value === "object" && value !== null && !Array.isArray(value) && !(value instanceof Uint8Array);
}

/** A frame from the server, or `null` if it is not one we can read. */
export function decodeFrame(bytes: ArrayBuffer | ArrayBufferView): Reply | Event | null {
  let frame: unknown;
  try {
    frame = decoder.decode(bytes);
  } catch {
    return null;
  }
  if (!isMap(frame) || typeof frame.type !== "string") return null;
  const data = isMap(frame.data) ? frame.data : {};
  if (frame.type === "reply") {
    const id = Number.isSafeInteger(frame.id) ? (frame.id as number) : null;
    const raw = isMap(frame.error) ? frame.error : {};
    const error = {
      ...raw,
      code: typeof raw.code === "string" ? raw.code : "internal",
      message: typeof raw.message === "string" ? raw.message : "",
    };
    return { kind: "reply", id, ok: frame.ok === true, data, error };
  }
  const seq = Number.isSafeInteger(frame.seq) ? (frame.seq as number) : undefined;
  return { kind: "event", type: frame.type, seq, data };
}
