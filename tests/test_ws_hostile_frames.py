"""Hostile WebSocket frames from a client, byte by byte and whole: each gets RFC 6455's close code.

The transport reads common frames itself (masked binary messages, pings,
pongs) and hands anything else to wsproto at a frame boundary; these cases
pin both paths: every frame the direct reader must refuse to take, the early
1009 from a header alone, and the close-frame rules wsproto enforces.
"""

from __future__ import annotations

import pytest

from dongne.transport import BinaryFrame, TextFrame

from .wsframes import MASK, client_frame, read_all

MAX = 70_000


def header64(op: int, n: int) -> bytes:
    return bytes((0x80 | op, 0x80 | 127)) + n.to_bytes(8, "big") + MASK


def close(code: int, reason: bytes = b"") -> bytes:
    return client_frame(8, code.to_bytes(2, "big") + reason)


OK = client_frame(2, b"ok")

CASES: dict[str, tuple[bytes, int]] = {
    "unmasked binary": (client_frame(2, b"hi", mask=None), 1002),
    "unmasked ping": (client_frame(9, b"hi", mask=None), 1002),
    "unmasked pong": (OK + client_frame(10, b"", mask=None), 1002),
    "rsv1 binary": (OK + client_frame(2, b"x", rsv=0x40), 1002),
    "rsv3 ping": (OK + client_frame(9, b"x", rsv=0x10), 1002),
    "reserved data opcode": (OK + client_frame(3, b"x"), 1002),
    "reserved control opcode": (OK + client_frame(0xB), 1002),
    "ping over 125 bytes": (OK + client_frame(9, bytes(126)), 1002),
    "ping with a 16-bit length": (OK + client_frame(9, bytes(5), form=16), 1002),
    "pong with a 64-bit length": (OK + client_frame(10, bytes(5), form=64), 1002),
    "fragmented ping": (OK + client_frame(9, b"x", fin=False), 1002),
    "continuation without a start": (OK + client_frame(0, b"x"), 1002),
    "binary inside a fragmented message": (OK + client_frame(2, b"a", fin=False) + client_frame(2, b"b"), 1002),
    "64-bit length with the high bit": (OK + header64(2, 1 << 63) + b"x" * 10, 1002),
    "non-minimal 64-bit length": (OK + client_frame(2, bytes(200), form=64), 1002),
    "non-minimal 16-bit length": (OK + client_frame(2, bytes(5), form=16), 1002),
    "a header declaring 2**62 bytes": (OK + header64(2, 1 << 62), 1009),
    "a header one byte over the limit": (OK + client_frame(2, bytes(MAX + 1))[:14], 1009),
    "fragments over the limit": (OK + client_frame(2, bytes(40_000), fin=False) + client_frame(0, bytes(40_000)), 1009),
    "text over the limit": (OK + client_frame(1, b"a" * (MAX + 1)), 1009),
    "text that is not UTF-8": (OK + client_frame(1, b"\xff\xfe"), 1007),
    "close with a 1-byte payload": (OK + client_frame(8, b"\x03"), 1002),
    "close code 999": (OK + close(999), 1002),
    "close code 1005": (OK + close(1005), 1002),
    "close code 5000": (OK + close(5000), 1002),
    "close code 4999 (echoed)": (OK + close(4999), 4999),
    "empty close": (OK + client_frame(8), 1000),
    "close reason not UTF-8": (OK + close(1000, b"\xff"), 1007),
    "close over 125 bytes": (OK + close(1000, b"a" * 124), 1002),
    "fragmented close": (OK + client_frame(8, (1000).to_bytes(2, "big"), fin=False), 1002),
}


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20], ids=["bytewise", "3-byte", "whole"])
@pytest.mark.parametrize("name", sorted(CASES))
async def test_hostile_frame_gets_its_close_code(name: str, chunk: int) -> None:
    stream, expected = CASES[name]
    got, _back, code = await read_all(stream, chunk)

    assert code == expected
    assert all(m == BinaryFrame(b"ok") for m in got)  # nothing after the bad frame is delivered


async def test_pings_are_answered_with_their_payload_even_inside_a_fragmented_message() -> None:
    payload = bytes(range(125))
    stream = (
        OK + client_frame(9, payload) + client_frame(9) + client_frame(10, b"zz")
        + client_frame(2, b"a", fin=False) + client_frame(9, b"mid") + client_frame(0, b"b") + close(1000)
    )  # fmt: skip
    for chunk in (1, 5, 1 << 20):
        got, back, code = await read_all(stream, chunk)
        assert got == [BinaryFrame(b"ok"), BinaryFrame(b"ab")]
        pongs = [back[i + 2 : i + 2 + n] for i, n in _frames(back) if back[i] == 0x8A]
        assert pongs == [payload, b"", b"mid"]
        assert code == 1000


async def test_the_limit_is_exact_and_every_mask_key_unmasks() -> None:
    at_limit = client_frame(2, bytes(range(256)) * (MAX // 256) + bytes(MAX % 256), mask=b"\x9a\xbc\xde\xf0")
    keys = client_frame(2, b"hello", mask=b"\xff\x00\xaa\x55") + client_frame(2, bytes(300), mask=b"\x00\x00\x00\x00")
    got, _back, code = await read_all(keys + at_limit + close(1000), 1 << 20)
    assert [len(m.payload) for m in got if isinstance(m, BinaryFrame)] == [5, 300, MAX]
    assert got[0] == BinaryFrame(b"hello") and code == 1000


async def test_frames_in_the_handshake_packet_and_text_split_across_fragments() -> None:
    text = "제주".encode()
    stream = client_frame(9, b"p") + client_frame(1, text[:1], fin=False) + client_frame(0, text[1:]) + close(1000)
    got, _back, code = await read_all(stream, 2)
    assert got == [TextFrame(len(text))] and code == 1000  # text is refused later, by the driver, by its length


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(offset, payload length) of each unmasked server frame with a 7-bit length."""
    out, i = [], 0
    while i + 2 <= len(data):
        n = data[i + 1] & 0x7F
        assert n < 126
        out.append((i, n))
        i += 2 + n
    return out


@pytest.mark.parametrize("size", [0, 1])
async def test_a_flood_of_tiny_fragments_is_refused_early(size: int) -> None:
    """Each fragment costs against the limit: 300,000 empty (or 1-byte) ones end at 1009, not in 300,000 list entries."""
    stream = OK + client_frame(2, b"a", fin=False) + client_frame(0, b"b" * size, fin=False) * 300_000
    got, _back, code = await read_all(stream, 1 << 16)
    assert got == [BinaryFrame(b"ok")] and code == 1009


async def test_a_message_in_a_few_fragments_up_to_the_limit_is_whole() -> None:
    pieces = [bytes([i]) * (MAX // 4 - 64) for i in range(4)]
    stream = (
        client_frame(2, pieces[0], fin=False)
        + client_frame(0, pieces[1], fin=False)
        + client_frame(0, pieces[2], fin=False)
    )
    got, _back, code = await read_all(stream + client_frame(0, pieces[3]) + close(1000), 1 << 20)
    assert got == [BinaryFrame(b"".join(pieces))] and code == 1000
