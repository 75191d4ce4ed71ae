// A small msgpack encoder/decoder for the dongne admin page: the subset the
// protocol uses (nil, bool, int, float, str, bin, array, map). No extension
// types: they are refused when decoding. Exposed as window.DongneMsgpack.
//
// Numbers: a JavaScript integer within ±(2^53 − 1) is sent as the smallest
// msgpack int, any other number as float64; a BigInt as a 64-bit int.
// Decoded 64-bit ints beyond ±(2^53 − 1) become the nearest Number (e.g. a
// ban "for good", 2^62, is exact; others may be rounded).
"use strict";

(() => {
  const utf8Encoder = new TextEncoder();
  const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

  class Writer {
    constructor() {
      this.bytes = new Uint8Array(256);
      this.view = new DataView(this.bytes.buffer);
      this.length = 0;
    }

    ensure(n) {
      if (this.length + n <= this.bytes.length) return;
      let size = this.bytes.length * 2;
      while (size < this.length + n) size *= 2;
      const bigger = new Uint8Array(size);
      bigger.set(this.bytes.subarray(0, this.length));
      this.bytes = bigger;
      this.view = new DataView(bigger.buffer);
    }

    u8(v) { this.ensure(1); this.view.setUint8(this.length, v); this.length += 1; }
    u16(v) { this.ensure(2); this.view.setUint16(this.length, v); this.length += 2; }
    u32(v) { this.ensure(4); this.view.setUint32(this.length, v); this.length += 4; }
    u64(v) { this.ensure(8); this.view.setBigUint64(this.length, v); this.length += 8; }
    i64(v) { this.ensure(8); this.view.setBigInt64(this.length, v); this.length += 8; }
    f64(v) { this.ensure(8); this.view.setFloat64(this.length, v); this.length += 8; }
    raw(b) { this.ensure(b.length); this.bytes.set(b, this.length); this.length += b.length; }

    result() { return this.bytes.slice(0, this.length); }
  }

  function encodeInt(w, v) {
    if (v >= 0) {
      if (v < 0x80) w.u8(v);
      else if (v <= 0xff) { w.u8(0xcc); w.u8(v); }
      else if (v <= 0xffff) { w.u8(0xcd); w.u16(v); }
      else if (v <= 0xffffffff) { w.u8(0xce); w.u32(v); }
      else { w.u8(0xcf); w.u64(BigInt(v)); }
    } else if (v >= -32) w.u8(v & 0xff);
    else if (v >= -0x80) { w.u8(0xd0); w.u8(v & 0xff); }
    else if (v >= -0x8000) { w.u8(0xd1); w.u16(v & 0xffff); }
    else if (v >= -0x80000000) { w.u8(0xd2); w.u32(v >>> 0); }
    else { w.u8(0xd3); w.i64(BigInt(v)); }
  }

  function encodeLength(w, n, fix, fixMax, c8, c16, c32) {
    if (fix !== null && n <= fixMax) w.u8(fix | n);
    else if (c8 !== null && n <= 0xff) { w.u8(c8); w.u8(n); }
    else if (n <= 0xffff) { w.u8(c16); w.u16(n); }
    else if (n <= 0xffffffff) { w.u8(c32); w.u32(n); }
    else throw new RangeError("msgpack: too long");
  }

  function encodeValue(w, v, depth) {
    if (depth > 64) throw new RangeError("msgpack: nested too deeply");
    if (v === null || v === undefined) w.u8(0xc0);
    else if (v === false) w.u8(0xc2);
    else if (v === true) w.u8(0xc3);
    else if (typeof v === "number") {
      if (Number.isSafeInteger(v)) encodeInt(w, v);
      else { w.u8(0xcb); w.f64(v); }
    } else if (typeof v === "bigint") {
      if (v >= 0n) {
        if (v > 0xffffffffffffffffn) throw new RangeError("msgpack: integer out of range");
        w.u8(0xcf); w.u64(v);
      } else {
        if (v < -0x8000000000000000n) throw new RangeError("msgpack: integer out of range");
        w.u8(0xd3); w.i64(v);
      }
    } else if (typeof v === "string") {
      const b = utf8Encoder.encode(v);
      encodeLength(w, b.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
      w.raw(b);
    } else if (v instanceof Uint8Array || v instanceof ArrayBuffer) {
      const b = v instanceof Uint8Array ? v : new Uint8Array(v);
      encodeLength(w, b.length, null, 0, 0xc4, 0xc5, 0xc6);
      w.raw(b);
    } else if (Array.isArray(v)) {
      encodeLength(w, v.length, 0x90, 15, null, 0xdc, 0xdd);
      for (const item of v) encodeValue(w, item, depth + 1);
    } else if (typeof v === "object") {
      const entries = Object.entries(v).filter(([, x]) => x !== undefined);
      encodeLength(w, entries.length, 0x80, 15, null, 0xde, 0xdf);
      for (const [k, x] of entries) {
        encodeValue(w, k, depth + 1);
        encodeValue(w, x, depth + 1);
      }
    } else {
      throw new TypeError(`msgpack: cannot encode a ${typeof v}`);
    }
  }

  function encode(value) {
    const w = new Writer();
    encodeValue(w, value, 0);
    return w.result();
  }

  function decode(input) {
    const bytes = input instanceof Uint8Array ? input : new Uint8Array(input);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let pos = 0;

    const need = (n) => {
      if (pos + n > bytes.length) throw new RangeError("msgpack: truncated");
    };
    const u8 = () => { need(1); return view.getUint8(pos++); };
    const u16 = () => { need(2); const v = view.getUint16(pos); pos += 2; return v; };
    const u32 = () => { need(4); const v = view.getUint32(pos); pos += 4; return v; };
    const big = (signed) => {
      need(8);
      const v = signed ? view.getBigInt64(pos) : view.getBigUint64(pos);
      pos += 8;
      return Number(v);
    };
    const take = (n) => { need(n); const b = bytes.subarray(pos, pos + n); pos += n; return b; };
    const str = (n) => utf8Decoder.decode(take(n));
    const array = (n, depth) => {
      const out = [];
      for (let i = 0; i < n; i++) out.push(value(depth + 1));
      return out;
    };
    const map = (n, depth) => {
      const out = {};
      for (let i = 0; i < n; i++) {
        const key = value(depth + 1);
        const k = typeof key === "string" ? key : String(key);
        // A key "__proto__" is data, not the object's prototype.
        Object.defineProperty(out, k, { value: value(depth + 1), enumerable: true, writable: true, configurable: true });
      }
      return out;
    };

    function value(depth) {
      if (depth > 64) throw new RangeError("msgpack: nested too deeply");
      const t = u8();
      if (t < 0x80) return t;
      if (t >= 0xe0) return t - 0x100;
      if (t >= 0xa0 && t <= 0xbf) return str(t & 0x1f);
      if (t >= 0x90 && t <= 0x9f) return array(t & 0x0f, depth);
      if (t >= 0x80 && t <= 0x8f) return map(t & 0x0f, depth);
      switch (t) {
        case 0xc0: return null;
        case 0xc2: return false;
        case 0xc3: return true;
        case 0xc4: return take(u8()).slice();
        case 0xc5: return take(u16()).slice();
        case 0xc6: return take(u32()).slice();
        case 0xca: { need(4); const v = view.getFloat32(pos); pos += 4; return v; }
        case 0xcb: { need(8); const v = view.getFloat64(pos); pos += 8; return v; }
        case 0xcc: return u8();
        case 0xcd: return u16();
        case 0xce: return u32();
        case 0xcf: return big(false);
        case 0xd0: { need(1); return view.getInt8(pos++); }
        case 0xd1: { need(2); const v = view.getInt16(pos); pos += 2; return v; }
        case 0xd2: { need(4); const v = view.getInt32(pos); pos += 4; return v; }
        case 0xd3: return big(true);
        case 0xd9: return str(u8());
        case 0xda: return str(u16());
        case 0xdb: return str(u32());
        case 0xdc: return array(u16(), depth);
        case 0xdd: return array(u32(), depth);
        case 0xde: return map(u16(), depth);
        case 0xdf: return map(u32(), depth);
        default: throw new TypeError(`msgpack: unsupported type byte 0x${t.toString(16)}`);
      }
    }

    const result = value(0);
    if (pos !== bytes.length) throw new RangeError("msgpack: trailing bytes");
    return result;
  }

  window.DongneMsgpack = Object.freeze({ encode, decode });
})();
