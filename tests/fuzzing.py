"""The fuzz frame space and its oracle, shared by ``tests/test_fuzz.py`` and ``bench/fuzz.py``.

Theory of operation: Hypothesis strategies describe the frame space (random
bytes; msgpack values of every type; hand-built msgpack bytes a packer would
never write: huge ints, invalid ext and timestamp types, lone surrogates,
10,000-level nesting; every operation of PROTOCOL.md with wrong types and
hostile values), grouped in ``FAMILIES`` and mixed by ``fuzz_frames``.
``draw_frames`` draws a fixed, seeded list of frames up front (Hypothesis in
generate-only mode). Frames name real questions and answers by placeholders
that ``bind_ids`` swaps for the server's ids. The oracle is PROTOCOL.md alone:
``expectation`` says what a correct server answers to a frame, and
``check_reply`` lists what is wrong with a reply: exactly one reply, the right
``id``, ``ok`` only for an operation that exists, and otherwise a code
PROTOCOL.md documents for that operation, never ``internal``.

Nothing here does I/O or needs pytest: the test suite imports it as
``tests.fuzzing`` (relatively), the bench as ``tests.fuzzing`` with the
repository on ``sys.path``, so both fuzz the same frame space.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import ipaddress
import itertools
import math
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs
import msgpack
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

__all__ = [
    "A_DEL",
    "A_HIDE",
    "A_MINE",
    "A_THEIRS",
    "CLOSE_CODES",
    "ERROR_CODES",
    "EVENT_TYPES",
    "FAMILIES",
    "MAX_FRAME_BYTES",
    "MAX_INT",
    "MIN_INT",
    "MODERATION_OPS",
    "MOD_PLACEHOLDERS",
    "OPS",
    "OP_CODES",
    "PLACEHOLDERS",
    "Q_DEL",
    "Q_HIDE",
    "Q_MINE",
    "Q_THEIRS",
    "R_OPEN",
    "U_VICTIM",
    "Expect",
    "any_value",
    "bind_ids",
    "check_reply",
    "cidrs",
    "cursors",
    "deep_array",
    "deep_map",
    "draw_frames",
    "expectation",
    "frame_bytes",
    "fuzz_frames",
    "mp_map",
    "packb",
    "random_bytes",
    "short",
    "spares_loopback",
    "unknown_ops",
]

# ---- what PROTOCOL.md documents ------------------------------------------------------

#: "Error codes" in PROTOCOL.md. ``internal`` is documented but is a server bug.
ERROR_CODES = frozenset(
    {
        "bad_frame", "unknown_op", "already_authenticated", "invalid_field", "too_long", "invalid_location",
        "outside_service_area", "not_found", "forbidden", "not_joined", "rate_limited", "spam", "limit_exceeded",
        "already_accepted", "question_closed", "internal", "unavailable",
    }
)  # fmt: skip

#: "Close codes" in PROTOCOL.md (1000 also stands for the echo of a client's close).
CLOSE_CODES = frozenset({1000, 1001, 1002, 1007, 1009, 1013, 4001, 4002, 4003, 4008, 4009})

#: The events of PROTOCOL.md (a fuzz connection may get ``nearby_questions`` after ``update_location``).
EVENT_TYPES = frozenset(
    {
        "answer_notification", "answer_accepted_notification", "new_answer", "answer_accepted", "question_closed",
        "user_online", "user_offline", "user_typing", "user_stop_typing", "receipt", "new_question_notification",
        "slow_response_alert", "nearby_questions", "storage_alert", "unread_count", "question_deleted",
        "answer_deleted", "content_hidden",
    }
)  # fmt: skip

#: The durable events (``list_notifications``' ``types`` names only these).
DURABLE_EVENT_TYPES = (
    "answer_notification", "answer_accepted_notification", "new_question_notification", "slow_response_alert",
    "content_hidden",
)  # fmt: skip

_Q = frozenset({"invalid_field", "not_found"})  # every op that names a question
_LOC = frozenset({"invalid_field", "invalid_location", "outside_service_area"})  # every op that takes a location
_ADMIN = frozenset({"forbidden", "invalid_field"})  # every admin operation

#: The error codes each operation can answer with, from its section in PROTOCOL.md
#: ("rate_limited" applies to every request: see "Limits and content rules").
OP_CODES: Mapping[str, frozenset[str]] = {
    op: codes | {"rate_limited"}
    for op, codes in {
        "hello": frozenset({"already_authenticated"}),
        "create_question": _LOC | {"too_long", "spam"},  # at the cap of rooms it asks without joining
        "join_question": _Q | {"limit_exceeded"},
        "leave_question": _Q | {"not_joined"},
        "create_answer": _Q | {"too_long", "spam", "forbidden", "question_closed"},
        # Its section omits question_closed (accepting on a closed question); the error table has it.
        "accept_answer": _Q | {"forbidden", "already_accepted", "question_closed"},
        "close_question": _Q | {"forbidden", "question_closed"},
        "typing_start": _Q | {"not_joined"},
        "typing_stop": _Q | {"not_joined"},
        "mark_read": _Q | {"forbidden"},
        "get_profile": frozenset(),
        "ping": frozenset(),
        "update_location": _LOC,
        "nearby_questions": _LOC,
        "nearby_locals": _LOC,
        "get_settings": frozenset(),
        "update_settings": _LOC,
        "trending": frozenset({"invalid_field", "too_long"}),
        "hotspots": frozenset({"invalid_field", "forbidden"}),  # admins only
        "metrics": frozenset({"forbidden"}),  # admins only
        # The read paths: a forged or foreign cursor is invalid_field.
        "get_question": _Q,
        "my_questions": frozenset({"invalid_field"}),
        "my_answers": frozenset({"invalid_field"}),
        "browse_questions": frozenset({"invalid_field", "too_long"}),
        "get_user": frozenset({"invalid_field", "not_found"}),
        "list_notifications": frozenset({"invalid_field"}),
        "mark_notifications_read": frozenset({"invalid_field"}),
        "delete_question": _Q | {"forbidden"},
        "delete_answer": frozenset({"invalid_field", "not_found", "forbidden"}),
        # "Moderation (admins only)": forbidden for anyone but an admin; a reason,
        # a note or a cidr over its limit is too_long (see "Error codes").
        "ban_user": _ADMIN | {"not_found", "too_long"},  # also forbidden: banning yourself
        "unban_user": _ADMIN | {"not_found", "too_long"},
        "list_audit": _ADMIN,
        "hide_question": _ADMIN | {"not_found", "too_long"},
        "hide_answer": _ADMIN | {"not_found", "too_long"},
        "unhide_question": _ADMIN | {"not_found", "too_long"},
        "unhide_answer": _ADMIN | {"not_found", "too_long"},
        # Any user; your own content is forbidden.
        "report_content": frozenset({"invalid_field", "not_found", "forbidden", "too_long"}),
        "list_reports": _ADMIN,  # a forged cursor is invalid_field
        "resolve_report": _ADMIN | {"not_found"},
        "block_ip": _ADMIN | {"too_long"},
        "unblock_ip": _ADMIN | {"not_found", "too_long"},
        "list_ip_blocks": _ADMIN,
    }.items()
}
OPS = tuple(op for op in OP_CODES if op != "hello")
#: The operations of "Moderation (admins only)" (report_content is any user's).
MODERATION_OPS = (
    "ban_user", "unban_user", "list_audit", "hide_question", "hide_answer", "unhide_question", "unhide_answer",
    "report_content", "list_reports", "resolve_report", "block_ip", "unblock_ip", "list_ip_blocks",
)  # fmt: skip

MAX_FRAME_BYTES = 65536  # the default max_frame_bytes
MIN_INT, MAX_INT = -(2**63), 2**63 - 1

# ---- ids the fuzzer may name ------------------------------------------------------------
#
# Frames are drawn before the server makes any id, so they name real questions
# and answers by placeholders as long as a real id (21 characters); ``bind_ids``
# swaps them in the encoded bytes, which keeps every msgpack length valid.

Q_MINE = "qFUZZ_PLACEHOLDER_QM_"  # asked by the fuzzer
Q_THEIRS = "qFUZZ_PLACEHOLDER_QT_"  # asked by a helper user
A_MINE = "aFUZZ_PLACEHOLDER_AM_"  # the helper's answer to Q_MINE
A_THEIRS = "aFUZZ_PLACEHOLDER_AT_"  # the fuzzer's answer to Q_THEIRS
# What the delete operations aim at mostly, so that the questions and answers
# above live through most of a run: another question of the fuzzer's and
# another answer of the fuzzer's to Q_THEIRS.
Q_DEL = "qFUZZ_PLACEHOLDER_QD_"
A_DEL = "aFUZZ_PLACEHOLDER_AD_"
PLACEHOLDERS = (Q_MINE, Q_THEIRS, A_MINE, A_THEIRS, Q_DEL, A_DEL)
# What the moderation operations aim at, so that a fuzz run never ends itself
# (a ban of its own user or of another worker's, a block of 127.0.0.1) and the
# questions and answers above stay shown: a victim user with no connection (a
# ban closes nothing), the victim's question and the victim's answer to
# Q_THEIRS (hide, unhide and report targets: their content_hidden events go to
# the victim, not to the fuzzer), and a helper's open report of Q_HIDE.
U_VICTIM = "uFUZZ_PLACEHOLDER_UV_"
Q_HIDE = "qFUZZ_PLACEHOLDER_QH_"
A_HIDE = "aFUZZ_PLACEHOLDER_AH_"
R_OPEN = "rFUZZ_PLACEHOLDER_RO_"
MOD_PLACEHOLDERS = (U_VICTIM, Q_HIDE, A_HIDE, R_OPEN)
ID_LEN = 21
assert all(len(p) == ID_LEN for p in (*PLACEHOLDERS, *MOD_PLACEHOLDERS))


def bind_ids(payload: bytes | str, ids: Mapping[str, str]) -> bytes | str:
    """Replace each placeholder with its real id (same length) in an encoded frame."""
    for placeholder, real in ids.items():
        assert len(real) == len(placeholder), (placeholder, real)
        if isinstance(payload, str):
            payload = payload.replace(placeholder, real)
        else:
            payload = payload.replace(placeholder.encode(), real.encode())
    return payload


# ---- msgpack by hand ------------------------------------------------------------------------


def packb(value: Any) -> bytes:
    """msgpack, letting lone surrogates through as (invalid) UTF-8 bytes."""
    return bytes(msgpack.packb(value, unicode_errors="surrogatepass"))


def mp_map(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map from already encoded keys and values (any bytes at all)."""
    items = list(pairs)
    n = len(items)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in items)


def frame_bytes(*, type_: bytes = b"\xabget_profile", id_: bytes = b"\x01", data: bytes | None = b"\x80") -> bytes:
    """A request map whose ``type``, ``id`` and ``data`` are raw msgpack bytes."""
    pairs = [(b"\xa4type", type_), (b"\xa2id", id_)]
    if data is not None:
        pairs.append((b"\xa4data", data))
    return mp_map(pairs)


def deep_array(levels: int) -> bytes:
    return b"\x91" * levels + b"\xc0"


def deep_map(levels: int) -> bytes:
    return b"\x81\xa1k" * levels + b"\xc0"


def deep_mixed(levels: int) -> bytes:
    return b"\x81\xa1k\x91" * (levels // 2) + b"\xc0"


#: msgpack values no well-behaved packer writes, as raw bytes.
CRAFTED_VALUES: tuple[bytes, ...] = (
    b"\xc1",  # the one byte msgpack never uses
    b"",  # nothing at all
    b"\xcf" + b"\xff" * 8,  # uint64 max: beyond int64
    b"\xcf\x80" + b"\x00" * 7,  # 2**63
    b"\xd3\x80" + b"\x00" * 7,  # int64 min
    b"\xd3\x7f" + b"\xff" * 7,  # int64 max
    b"\xd4\xff\x00",  # timestamp ext of 1 byte: invalid length
    b"\xd5\xff\x00\x00",  # timestamp ext of 2 bytes
    b"\xd6\xff\xff\xff\xff\xff",  # a valid timestamp32
    b"\xd7\xff" + b"\xff" * 8,  # timestamp64, nanoseconds > 999,999,999
    b"\xc7\x0c\xff\xff\xff\xff\xff\x7f" + b"\xff" * 7,  # timestamp96, nanoseconds > 999,999,999
    b"\xd8\xff" + b"\x00" * 16,  # timestamp ext of 16 bytes
    b"\xd4\x80\x00",  # ext type -128 (reserved)
    b"\xd4\x81\x00",  # ext type -127 (reserved)
    b"\xc7\x00\x05",  # empty ext
    b"\xc9\x00\x00\x00\x10\x01" + b"\xff" * 16,  # ext32: a 128-bit "bignum"
    b"\xd8\x02" + b"\xff" * 16,  # fixext16: another "bignum"
    b"\xa3\xed\xa0\x80",  # a lone surrogate (U+D800 as CESU-8)
    b"\xa6\xed\xa0\xbd\xed\xb8\x80",  # a surrogate pair as CESU-8
    b"\xa2\xc0\x80",  # an overlong NUL
    b"\xa1\xff",  # not UTF-8
    b"\xa4\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB, truncated
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB, truncated
    b"\xdd\xff\xff\xff\xff",  # array32 of 4G items, truncated
    b"\xdf\xff\xff\xff\xff",  # map32 of 4G pairs, truncated
    b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB, truncated
    b"\xca\x7f\xc0\x00\x00",  # float32 NaN
    b"\xca\xff\x80\x00\x00",  # float32 -inf
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x01",  # float64 NaN with a payload
    b"\xcb\x7f\xf0" + b"\x00" * 6,  # float64 inf
    b"\xcb" + b"\x00" * 7 + b"\x01",  # the smallest subnormal
    b"\x81\xc0\xc0",  # a map with a nil key
    b"\x81\x01\x02",  # an int key
    b"\x81\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\x01",  # a NaN key
    b"\x81\x92\x01\x02\x03",  # an array key
    b"\x81\x81\xa1a\x01\x02",  # a map key
    b"\x81\xc4\x02id\x01",  # a bin key
    b"\x82\xa2id\x01\xa2id\x02",  # a repeated key
    b"\x90",
    b"\x80",
    b"\xc0",
    b"\xc2",
    b"\xc3",
    deep_array(33),
    deep_map(33),
    deep_array(1000),
    deep_map(1000),
    deep_array(10_000),
    deep_map(10_000),
    deep_mixed(10_000),
    deep_array(60_000),
)

# ---- strategies: values ------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """``one_of`` with integer weights (Hypothesis shrinks toward the first choice)."""
    bounds = list(itertools.accumulate(weight for weight, _ in choices))
    strategies = [strategy for _, strategy in choices]
    return st.integers(0, bounds[-1] - 1).flatmap(lambda n: strategies[bisect.bisect_right(bounds, n)])


NAN, INF = math.nan, math.inf

EDGE_STRINGS = (
    "", " ", "\t\n\r", "\u3000", "\x00", "a\x00b", "\x00" * 64, "\u202e\u202d", "\u200f\u200e", "\u202ereversed",
    "\ufeff", "\u200b" * 10, "\u00ad", "👍🏽", "👨‍👩‍👧‍👦", "🇰🇷", "e\u0301" * 300, "\U0010ffff", "\uffff", "\ufffd",
    "\ud7a3", "ㄱ", "İ", "ǅ", "\u212a", "ß", "Ω", "﷽", "\\", "'\"", "%s%n%x", "${jndi:ldap://x/a}", "<script>",
    "'; DROP TABLE questions; --", "../../etc/passwd", "q" * 64, "q" * 65, "x" * 200, "x" * 201, " " * 300 + "x",
    "get_profile", "__proto__", "constructor", "None", "null", "NaN", "-0", "1e309",
)  # fmt: skip

SIZES = (1, 30, 31, 63, 64, 65, 199, 200, 201, 999, 1000, 1001, 1999, 2000, 2001, 10_000, 30_000, 64_000)

#: Strings of a length near a limit, in 1- to 4-byte characters; some make the frame oversize.
sized_strings = st.builds(
    lambda n, c: c * n, st.sampled_from(SIZES), st.sampled_from(("x", "é", "한", "👍", "\u200f", "\x00", " "))
)

#: Text with lone surrogates (sent as their invalid UTF-8 bytes by ``packb``).
surrogate_strings = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3).map(lambda s: "a" + s + "b")


#: Hostile text the server can read (a lone surrogate makes the whole frame unreadable: rare).
hostile_text = weighted(
    (30, st.sampled_from(EDGE_STRINGS)),
    (30, st.text(max_size=40)),
    (35, sized_strings),
    (5, surrogate_strings),
)

small_text = st.one_of(st.sampled_from(EDGE_STRINGS[:40]), st.text(max_size=20))

ints = st.one_of(
    st.integers(MIN_INT, 2**64 - 1),
    st.sampled_from((0, -1, 1, MIN_INT, MAX_INT, MAX_INT + 1, 2**64 - 1, 2**53 + 1)),
)

floats = st.one_of(
    st.floats(),
    st.floats(width=32),
    st.sampled_from((NAN, INF, -INF, -0.0, 5e-324, 1.7976931348623157e308, -1.7976931348623157e308)),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    floats,
    small_text,
    st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
    st.builds(msgpack.Timestamp, st.integers(-(2**63), 2**63 - 1), st.integers(0, 999_999_999)),
)

map_keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(("type", "id", "data", "question_id", "title", "location", "lat", "lng")),
    st.binary(max_size=8),
    st.integers(MIN_INT, MAX_INT),
    st.none(),
    st.booleans(),
    st.floats(),
    st.tuples(st.integers(0, 3), st.text(max_size=3)),
)

#: A msgpack value the server can read as part of a request: maps keyed by strings only.
readable_value = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=12,
)

#: Any msgpack value: every type, nested, with maps keyed by anything.
any_value = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(map_keys, children, max_size=5),
    ),
    max_leaves=12,
)

# ---- strategies: operations with wrong types and hostile values ---------------------------


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: valid, hostile text, or another type."""
    return weighted((50, valid), (25, hostile_text), (25, readable_value))


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``field`` leaning to valid values: for operations whose checks come one after another
    (the moderation ones), so that the later checks and success are reached too."""
    return weighted((80, valid), (10, hostile_text), (10, readable_value))


coordinate = st.one_of(
    floats,
    ints,
    st.booleans(),
    st.none(),
    small_text,
    st.sampled_from((90.0, -90.0, 180.0, -180.0, 90.000001, -180.000001)),
)
jeju = st.fixed_dictionaries({"lat": st.floats(33.25, 33.55), "lng": st.floats(126.2, 126.9)})
locations = st.one_of(
    jeju,
    st.fixed_dictionaries({"lat": coordinate, "lng": coordinate}),
    st.fixed_dictionaries({"lat": st.floats(33.25, 33.55)}, optional={"lng": coordinate, "alt": readable_value}),
    st.sampled_from(({"lat": 37.5665, "lng": 126.978}, {"lat": 0.0, "lng": 0.0}, {}, [33.5, 126.5], "33.5,126.5")),
    readable_value,
)

hashtag_text = st.one_of(
    st.sampled_from(
        (
            "food",
            "#Food",
            "##food",
            "#",
            "",
            "제주",
            "흑돼지",
            "a" * 30,
            "a" * 31,
            "no spaces",
            "ÄÖ",
            "\u212a",
            "İ",
            "x\x00",
        )
    ),
    st.text(max_size=32),
)
hashtag_lists = st.one_of(
    st.lists(hashtag_text, max_size=7),
    st.builds(lambda n, tag: [tag] * n, st.sampled_from((6, 500, 10_000)), st.sampled_from(("a", "#food", "x" * 5))),
    readable_value,
)

#: Ids that name nothing: empty, too long, near misses, other types.
bogus_ids = weighted(
    (
        40,
        st.sampled_from(
            (
                "",
                "q-nope",
                "q" * 64,
                "q" * 65,
                "q" * 10_000,
                "\x00" * 64,
                Q_MINE.lower(),
                Q_MINE + " ",
                " " + Q_MINE[:-1],
                R_OPEN.lower(),
                "r" + "0" * 20,
            )
        ),
    ),
    (20, small_text),
    (20, ints),
    (20, readable_value),
)
ids = weighted((50, st.sampled_from(PLACEHOLDERS)), (50, bogus_ids))
id_lists = st.one_of(
    st.lists(ids, max_size=6),
    st.builds(lambda n, x: [x] * n, st.sampled_from((500, 501, 10_000)), st.sampled_from((A_MINE, "a", "x" * 64))),
    readable_value,
)

#: Ids for delete_question / delete_answer: mostly the deletable placeholders,
#: now and then another's (forbidden) or the fuzzer's own main ones.
delete_ids = weighted(
    (50, st.sampled_from((Q_DEL, A_DEL))),
    (15, st.sampled_from((Q_THEIRS, A_MINE))),
    (2, st.sampled_from((Q_MINE, A_THEIRS))),
    (33, ids),
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


#: A forged cursor's body: what a real one holds (kind, scope, position), unsigned or signed with garbage.
_cursor_bodies = st.builds(
    lambda kind, scope, position: packb([kind, scope, position]),
    st.sampled_from(("my_questions", "my_answers", "browse", "answers", "notifications", "reports", "")),
    st.sampled_from(
        ("fuzzer", "fuzzer0:all", "fuzzer:open", "#food:open", "Jeju-si#:all", Q_MINE, "open", "all", "resolved", "")
    ),
    st.one_of(
        st.tuples(st.integers(0, 2**63 - 1), st.sampled_from((Q_MINE, A_MINE, R_OPEN, "q"))).map(list),
        st.lists(readable_value, max_size=3),
        readable_value,
    ),
)

#: Page cursors: forged (a plausible body with a wrong or missing MAC), broken
#: base64, sizes around the 512-character limit, and values of other types.
cursors = weighted(
    (25, st.tuples(_cursor_bodies, st.binary(min_size=12, max_size=12)).map(lambda t: _b64(t[0] + t[1]))),
    (10, _cursor_bodies.map(_b64)),
    (15, st.binary(max_size=80).map(_b64)),
    (
        10,
        st.sampled_from(
            ("", "=", "==", "a", "ab", "abc", "!!!!", "a" * 16, "A" * 511, "A" * 512, "A" * 513, "%00", "a=b", " abc")
        ),
    ),
    (20, hostile_text),
    (20, readable_value),
)

durable_types = st.sampled_from(DURABLE_EVENT_TYPES)
event_type_lists = st.one_of(
    st.lists(durable_types, max_size=4),
    st.lists(
        st.one_of(durable_types, st.sampled_from(("new_answer", "unread_count", "", "ANSWER_NOTIFICATION"))), max_size=6
    ),
    st.builds(lambda n: ["answer_notification"] * n, st.sampled_from((5, 100, 10_000))),
    readable_value,
)
limits_1_100 = field(st.integers(-1, 101))

nested = st.builds(lambda levels: msgpack.unpackb(deep_map(levels), raw=False), st.sampled_from((5, 20, 31, 32, 33)))

# ---- moderation: targets that never end the run --------------------------------------------

_LOOPBACK = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("::ffff:127.0.0.0/104"),
)


def spares_loopback(value: Any) -> bool:
    """False for a ``cidr`` the server would read as a network holding the fuzzer's own address."""
    if not isinstance(value, str):
        return True
    for text in {value, value.strip()}:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue
        if any(net.version == lo.version and net.overlaps(lo) for lo in _LOOPBACK):
            return False
    return True


#: ``cidr`` for block_ip / unblock_ip: documentation ranges (RFC 5737, RFC 3849),
#: never 127.0.0.0/8 or ::1 (the fuzzer's own address), and malformed ones.
cidrs = weighted(
    (
        45,
        st.sampled_from(
            ("203.0.113.0/24", "198.51.100.7", "192.0.2.0/28", "203.0.113.9/32", "2001:db8::/32", "2001:db8::7")
        ),
    ),
    (
        25,
        st.sampled_from((
            "", " ", "not-an-ip", "256.0.0.1", "203.0.113.0/33", "203.0.113.0/-1", "2001:db8::/129", "1.2.3",
            "203.0.113.0/24/8", "198.51.100.7 ", "０.０.０.０", "203.0.113.0\x00/24", "x" * 64, "x" * 65, "1" * 200,
        )),
    ),
    (30, mostly(st.just("192.0.2.1")).filter(spares_loopback)),
)  # fmt: skip

#: ``until`` (ms since the epoch): far future (valid), past, the edges of the allowed range, other types.
untils = mostly(
    weighted(
        (50, st.sampled_from((4_102_444_800_000, 2**62 - 1))),
        (50, st.sampled_from((2**62, 1_600_000_000_000, 0, -1, MAX_INT, 2**53 + 1, 1.5e12))),
    )
)

reasons = mostly(
    weighted(
        (75, st.sampled_from(("selling casino links", "credential stuffing"))),
        (25, st.sampled_from(("x" * 500, "x" * 501))),
    )
)

#: Users to ban: mostly the victim; otherwise names the fuzzer can ban without
#: ending any run ("fuzzer" is the suite's fuzzer: banning yourself is forbidden;
#: the bench has no such user). Never a bench worker's ``fuzzerN``, a helper that
#: another worker may still be creating, or a bystander.
ban_targets = weighted(
    (60, st.just(U_VICTIM)),
    (15, st.sampled_from(("fuzzer", "fz_helper", "nobody", U_VICTIM.lower()))),
    (25, bogus_ids),
)
#: Hide and report targets: the victim's question and answer mostly.
hide_ids = weighted((60, st.sampled_from((Q_HIDE, A_HIDE))), (40, bogus_ids))
#: Reports: the victim's and the helper's content, now and then the fuzzer's own (forbidden).
report_question_ids = weighted((50, st.just(Q_HIDE)), (15, st.just(Q_THEIRS)), (10, st.just(Q_MINE)), (25, bogus_ids))
report_answer_ids = weighted((50, st.just(A_HIDE)), (15, st.just(A_MINE)), (10, st.just(A_THEIRS)), (25, bogus_ids))
report_ids = weighted((60, st.just(R_OPEN)), (40, bogus_ids))
audit_before = field(st.sampled_from((0, 1, 2, 1000, 2**53, 2**53 + 1, -1, MAX_INT)))

#: Each operation's fields: (required, optional), each value a ``field`` strategy.
OP_FIELDS: Mapping[str, tuple[dict[str, st.SearchStrategy[Any]], dict[str, st.SearchStrategy[Any]]]] = {
    "hello": ({"token": field(st.text(max_size=10))}, {"resume": readable_value}),
    "create_question": (
        {"title": field(st.sampled_from(("Black pork near the port?", "Open pharmacy?"))), "location": locations},
        {
            "body": field(st.just("Arriving tonight.")),
            "hashtags": hashtag_lists,
            "urgency": field(st.sampled_from(("normal", "urgent"))),
        },
    ),
    "join_question": ({"question_id": ids}, {}),
    "leave_question": ({"question_id": ids}, {}),
    "create_answer": ({"question_id": ids, "content": field(st.just("Try Dombedon."))}, {}),
    "accept_answer": ({"question_id": ids, "answer_id": ids}, {}),
    "close_question": ({"question_id": ids}, {}),
    "typing_start": ({"question_id": ids}, {}),
    "typing_stop": ({"question_id": ids}, {}),
    "mark_read": ({"question_id": ids}, {"answer_ids": id_lists}),
    "get_profile": ({}, {}),
    "ping": ({}, {}),
    "update_location": ({"location": locations}, {"accuracy_m": field(st.floats(0, 100_000))}),
    "nearby_questions": ({}, {"location": locations}),
    "nearby_locals": ({}, {"location": locations}),
    "get_settings": ({}, {}),
    "update_settings": (
        {},
        {
            "immediate_alerts": field(st.booleans()),
            "quiet_hours": field(st.one_of(st.none(), st.lists(st.integers(-1, 25), min_size=2, max_size=2))),
            "max_alerts_per_hour": field(st.integers(-1, 1001)),
            "home": st.one_of(st.none(), locations),
            "sound": readable_value,  # not a setting
        },
    ),
    "trending": (
        {},
        {"region": field(st.sampled_from(("Jeju-si", "Udo", "Seoul", "jeju-si"))), "limit": field(st.integers(0, 51))},
    ),
    "hotspots": ({}, {"limit": field(st.integers(0, 101))}),
    "metrics": ({}, {}),
    "get_question": ({"question_id": ids}, {"answers_after": cursors, "limit": limits_1_100}),
    "my_questions": (
        {},
        {
            "status": field(st.sampled_from(("open", "answered", "closed", "all", "expired", "resolved", "OPEN"))),
            "before": cursors,
            "limit": limits_1_100,
        },
    ),
    "my_answers": ({}, {"before": cursors, "limit": limits_1_100}),
    "browse_questions": (
        {},
        {
            "region": field(st.sampled_from(("Jeju-si", "Udo", "Seongsan", "Seoul", "jeju-si", "Jeju-si "))),
            "hashtag": field(hashtag_text),
            "status": field(st.sampled_from(("open", "all", "closed", "answered"))),
            "before": cursors,
            "limit": limits_1_100,
        },
    ),
    "get_user": ({"user_id": field(st.sampled_from(("fuzzer", "fz_helper", "fuzzer0", "fz_helper1", "nobody")))}, {}),
    "list_notifications": (
        {},
        {
            "before_seq": field(st.sampled_from((0, 1, 2, 3, 1000, 2**53, 2**53 + 1, -1, MAX_INT))),
            "limit": limits_1_100,
            "types": event_type_lists,
        },
    ),
    "mark_notifications_read": (
        {"up_to_seq": field(st.sampled_from((0, 1, 2, 1000, 2**53, 2**53 + 1, -1, MAX_INT, MIN_INT)))},
        {},
    ),
    "delete_question": ({"question_id": delete_ids}, {}),
    "delete_answer": ({"answer_id": delete_ids}, {}),
    "ban_user": ({"user_id": mostly(ban_targets), "reason": reasons}, {"until": untils}),
    "unban_user": ({"user_id": mostly(ban_targets)}, {"reason": reasons}),
    "list_audit": ({}, {"before": audit_before, "limit": limits_1_100}),
    "hide_question": ({"id": mostly(hide_ids), "reason": reasons}, {}),
    "hide_answer": ({"id": mostly(hide_ids), "reason": reasons}, {}),
    "unhide_question": ({"id": mostly(hide_ids)}, {"reason": reasons}),
    "unhide_answer": ({"id": mostly(hide_ids)}, {"reason": reasons}),
    "report_content": (
        {"reason": mostly(st.sampled_from(("spam", "abuse", "wrong", "other", "SPAM", "ban", "")))},
        # Exactly one of the ids is valid: see ONE_OF.
        {
            "question_id": mostly(report_question_ids),
            "answer_id": mostly(report_answer_ids),
            "note": field(st.sampled_from(("a shop link", "", "x" * 500, "x" * 501))),
        },
    ),
    "list_reports": (
        {},
        {
            "status": field(st.sampled_from(("open", "resolved", "all", "closed", "OPEN", ""))),
            "before": cursors,
            "limit": limits_1_100,
        },
    ),
    "resolve_report": (
        {"report_id": mostly(report_ids), "action": mostly(st.sampled_from(("dismiss", "hide", "ban", "delete", "")))},
        {},
    ),
    "block_ip": ({"cidr": cidrs, "reason": reasons}, {"until": untils}),
    "unblock_ip": ({"cidr": cidrs}, {"reason": reasons}),
    "list_ip_blocks": ({}, {}),
}


#: Operations that take exactly one of two optional fields: mostly just one of them is sent.
ONE_OF: Mapping[str, tuple[str, str]] = {"report_content": ("question_id", "answer_id")}


@st.composite
def op_data(draw: st.DrawFn, op: str) -> Any:
    """``data`` for ``op``: its fields (some missing or hostile), extra keys, sometimes not a map."""
    required, optional = OP_FIELDS.get(op, ({}, {}))
    kind = draw(st.integers(0, 99))
    if kind < 5:
        return draw(any_value)  # not a map, or a map of anything
    data: dict[Any, Any] = {}
    for name, strategy in required.items():
        if draw(st.integers(0, 9)) > 0:  # now and then a required field is missing
            data[name] = draw(strategy)
    for name, strategy in optional.items():
        if draw(st.booleans()):
            data[name] = draw(strategy)
    if op in ONE_OF and draw(st.integers(0, 9)) < 8:  # both or neither now and then
        keep, drop = ONE_OF[op] if draw(st.booleans()) else ONE_OF[op][::-1]
        data.pop(drop, None)
        if keep not in data:
            data[keep] = draw(optional[keep])
    if kind < 15:
        data.update(draw(st.dictionaries(st.text(max_size=12), readable_value, max_size=3)))
    elif kind < 18:
        data.update(draw(st.dictionaries(map_keys, any_value, min_size=1, max_size=3)))  # keys of any type
    elif kind < 23:
        data["nested"] = draw(nested)
    return data


unknown_ops = st.one_of(
    st.text(max_size=24),
    st.sampled_from((
        "", "HELLO", "Create_Question", "get_profile\x00", "get_profile ", " get_profile", "_op_get_profile",
        "__init__", "__class__", "receive", "refuse", "reply", "tick", "load", "constructor", "__proto__",
        "get_profile" * 1000, "create_questions", "\u202eeliforp_teg",
    )),
)  # fmt: skip

frame_ids = weighted(
    (85, st.integers(MIN_INT, MAX_INT)),
    (5, st.sampled_from((0, -1, MIN_INT, MAX_INT, MAX_INT + 1, 2**64 - 1, True, 1.0, "1"))),
    (5, st.none()),
    (5, any_value),
)


op_names = weighted((85, st.sampled_from((*OPS, "hello"))), (15, unknown_ops))  # hello last: the first is drawn most


@st.composite
def op_frames(draw: st.DrawFn) -> bytes:
    """A request map for a real (or unknown) operation with hostile fields."""
    op = draw(op_names)
    frame: dict[Any, Any] = {}
    layout = draw(st.integers(0, 99))  # rare layouts mid-range: Hypothesis favours the ends
    frame["type"] = draw(any_value) if layout == 50 else op
    if layout != 51:
        frame["id"] = draw(frame_ids)
    if layout != 52:
        frame["data"] = draw(op_data(op))
    if layout == 53:
        frame[draw(map_keys)] = draw(any_value)  # a stray top-level key of any type
    return packb(frame)


# ---- strategies: bytes that are not msgpack, or not a request ---------------------------------


@st.composite
def crafted_frames(draw: st.DrawFn) -> bytes:
    """Hand-built msgpack bytes, as the whole frame or in one position of a request."""
    value = draw(st.sampled_from(CRAFTED_VALUES))
    where = draw(st.sampled_from(("whole", "id", "type", "data", "field", "key", "location", "trailing", "truncated")))
    op = draw(st.sampled_from(OPS))
    if where == "whole":
        return value
    if where == "id":
        return frame_bytes(id_=value)
    if where == "type":
        return frame_bytes(type_=value)
    if where == "data":
        return frame_bytes(type_=packb(op), data=value)
    if where == "field":
        name = draw(st.sampled_from(("question_id", "title", "content", "answer_ids", "hashtags", "urgency", "token")))
        return frame_bytes(type_=packb(op), data=mp_map([(packb(name), value)]))
    if where == "key":
        return frame_bytes(type_=packb(op), data=mp_map([(value or b"\xc0", b"\x01")]))
    if where == "location":
        loc = mp_map([(b"\xa3lat", value), (b"\xa3lng", packb(126.53))])
        return frame_bytes(
            type_=b"\xafcreate_question", data=mp_map([(b"\xa5title", b"\xa1t"), (b"\xa8location", loc)])
        )
    if where == "trailing":
        return frame_bytes() + (value or b"\x00")
    whole = frame_bytes(data=packb({"question_id": Q_MINE, "pad": value.hex()[:40]}))
    return whole[: draw(st.integers(0, len(whole) - 1))]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A request frame with a few bytes flipped, inserted, deleted or duplicated."""
    data = bytearray(draw(op_frames()))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.integers(0, 3))
        if how == 0:
            data[at] = draw(st.integers(0, 255))
        elif how == 1:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == 2:
            del data[at : at + draw(st.integers(1, 4))]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


random_bytes = st.one_of(st.binary(max_size=64), st.binary(max_size=2000))
random_values = st.one_of(
    any_value.map(packb),
    st.dictionaries(map_keys, any_value, max_size=6).map(packb),
    st.fixed_dictionaries({"id": st.integers(MIN_INT, MAX_INT)}, optional={"type": any_value, "data": any_value}).map(
        packb
    ),
)
text_frames = st.one_of(
    st.text(max_size=100), st.sampled_from(("", "get_profile", '{"type":"get_profile","id":1}', "x" * 70_000))
)

#: The frame families; the end-to-end test runs each against its own server.
FAMILIES: Mapping[str, st.SearchStrategy[bytes | str]] = {
    "bytes_and_values": st.one_of(random_bytes, random_values, text_frames),
    "crafted": crafted_frames(),
    "operations": op_frames(),
    "mutated": mutated_frames(),
}


def fuzz_frames() -> st.SearchStrategy[bytes | str]:
    """All families together (the bench's default); operations get the largest share."""
    return weighted(
        (40, FAMILIES["operations"]),
        (20, FAMILIES["mutated"]),
        (20, FAMILIES["crafted"]),
        (20, FAMILIES["bytes_and_values"]),
    )


def _key(value: Any) -> Any:
    """What tells drawn examples apart (their repr when they are not hashable)."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return (type(value), value)


@contextlib.contextmanager
def _without_local_constants() -> Iterator[None]:
    """Hypothesis (6.131 on) mixes literals from the project's own modules into what it draws, so a
    seed gave other frames after any edit anywhere in dongne or its tests, or with fewer test files
    collected; without them a seed draws the same frames whatever the code around it.

    Private API: with a Hypothesis that lacks it, nothing to take out.
    """
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants
        from hypothesis.internal.floats import float_to_int
        from sortedcontainers import SortedSet  # type: ignore[import-untyped]

        saved = (providers._get_local_constants, providers.CONSTANTS_CACHE)
        empty = Constants(
            integers=SortedSet(), floats=SortedSet(key=float_to_int), bytes=SortedSet(), strings=SortedSet()
        )
        fresh_cache = type(providers.CONSTANTS_CACHE)(1024)
    except (ImportError, AttributeError, TypeError):
        yield
        return
    providers._get_local_constants = lambda: empty
    providers.CONSTANTS_CACHE = fresh_cache
    try:
        yield
    finally:
        providers._get_local_constants, providers.CONSTANTS_CACHE = saved


def draw_frames(strategy: st.SearchStrategy[Any], n: int, *, seed_value: int = 0, batch: int = 25) -> list[Any]:
    """Draw ``n`` examples of ``strategy``, the same ones for the same seed.

    Hypothesis runs in generate-only mode (no shrinking, no database). Each test
    case draws a list of ``batch`` examples: per example that is about 4 times
    cheaper than one example per case (much longer lists overrun Hypothesis'
    buffer and get slower again). The examples are distinct: Hypothesis
    likes to repeat an element within a list and to draw an earlier example
    again, which left only about a quarter of the frames distinct; the rounds
    go on until ``n`` distinct ones are drawn (or 20 rounds).
    """
    out: list[Any] = []
    seen: set[Any] = set()
    for attempt in range(20):  # more rounds only while a round comes up short
        wanted = n - len(out)
        if wanted <= 0:
            break
        size = min(batch, wanted)

        @seed(seed_value * 1000 + attempt)
        @settings(
            max_examples=-(-wanted // size),
            database=None,
            phases=[Phase.generate],
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(strategy, min_size=size, max_size=size, unique_by=_key))
        def collect(values: list[Any]) -> None:
            for value in values:
                if (key := _key(value)) not in seen:
                    seen.add(key)
                    out.append(value)

        with _without_local_constants():
            collect()
    return out[:n]


# ---- the oracle ---------------------------------------------------------------------------


@attrs.frozen
class Expect:
    """What a correct server answers to one frame (sent after ``hello``)."""

    id: int | None  # the id the reply must echo
    codes: frozenset[str]  # the error codes it may carry
    may_succeed: bool  # whether ``ok: true`` is possible
    close: int | None = None  # a close code instead of a reply (oversize frames)
    op: str | None = None


def _readable_id(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and MIN_INT <= value <= MAX_INT:
        return value
    return None


def expectation(frame: bytes | str, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> Expect:
    """The documented answer to ``frame``, from PROTOCOL.md alone."""
    size = len(frame.encode("utf-8", "surrogatepass")) if isinstance(frame, str) else len(frame)
    if size > max_frame_bytes:
        return Expect(None, frozenset(), False, close=1009)
    bad = Expect(None, frozenset({"bad_frame"}), False)
    if isinstance(frame, str):
        return bad
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception:
        return bad
    if not isinstance(obj, dict):
        return bad
    rid = _readable_id(obj.get("id"))
    if rid is None:
        return bad
    op = obj.get("type")
    if not isinstance(op, str):
        return Expect(rid, frozenset({"bad_frame"}), False)
    codes = OP_CODES.get(op, frozenset({"unknown_op"}))
    # A known op may succeed unless it is hello (already sent); ``data`` that
    # is not a map (or too deep) is a bad_frame for any op.
    return Expect(rid, codes | {"bad_frame"}, op in OP_CODES and op != "hello", op=op)


def check_reply(frame: bytes | str, reply: Any, expect: Expect | None = None) -> list[str]:
    """Problems with ``reply`` (a decoded server frame) as the answer to ``frame``; [] if none."""
    expect = expect or expectation(frame)
    problems: list[str] = []
    if not isinstance(reply, dict) or reply.get("type") != "reply":
        return [f"expected a reply, got {short(reply)}"]
    if reply.get("id") != expect.id or type(reply.get("id")) is not type(expect.id):
        problems.append(f"reply id {reply.get('id')!r}, expected {expect.id!r}")
    if reply.get("ok") is True:
        if not expect.may_succeed:
            problems.append(f"ok reply to a frame that must fail (op {expect.op!r}): {short(reply)}")
        if not isinstance(reply.get("data"), dict):
            problems.append(f"ok reply without a data map: {short(reply)}")
        return problems
    if reply.get("ok") is not False:
        return [*problems, f"reply with ok={reply.get('ok')!r}"]
    error = reply.get("error")
    if not isinstance(error, dict):
        return [*problems, f"error reply without an error map: {short(reply)}"]
    code, message = error.get("code"), error.get("message")
    if code == "internal":
        problems.append(f"internal error: {message!r}")
    elif code not in ERROR_CODES:
        problems.append(f"undocumented error code {code!r}: {message!r}")
    elif code not in expect.codes:
        problems.append(
            f"code {code!r} not documented for op {expect.op!r} (allowed {sorted(expect.codes)}): {message!r}"
        )
    if not isinstance(message, str) or not message:
        problems.append(f"error without a message: {short(reply)}")
    return problems


def short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
