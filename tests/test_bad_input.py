"""Bad input gets a documented error code; the connection and others carry on."""

from __future__ import annotations

import base64
import json
import logging
import math
import socket
import struct
import time
from typing import Any

import jwt
import msgpack
import pytest
import trio
import trio_websocket

from dongne.client import RequestError

from .conftest import SECRET, Harness, db_rows, question_data, token


def _unsigned_none_token() -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    claims = json.dumps({"sub": "admin", "role": "admin", "exp": int(time.time()) + 60}).encode()
    return b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(claims) + "."


async def _raw_reply(client, payload: bytes | str) -> dict:  # type: ignore[no-untyped-def]
    await client.send_raw(payload)
    return await client.next_event("reply")


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"\xc1\xff\x00", "bad_frame"),  # not msgpack
        (msgpack.packb([1, 2, 3]), "bad_frame"),  # not a map
        (msgpack.packb({"type": "join_question"}), "bad_frame"),  # no id
        (msgpack.packb({"id": "7", "type": "join_question"}), "bad_frame"),  # id not an int
        (msgpack.packb({1: 2}), "bad_frame"),  # non-string keys
        (msgpack.packb({"id": 2**64 - 1, "type": "x"}), "bad_frame"),  # id beyond int64
        (msgpack.packb({"a": 1}) + b"\x00", "bad_frame"),  # trailing bytes
        ("a text frame", "bad_frame"),
    ],
)
async def test_unreadable_frames(server: Harness, payload: bytes | str, code: str) -> None:
    async with server.connect("u") as client:
        reply = await _raw_reply(client, payload)
        assert reply["ok"] is False
        assert reply["id"] is None
        assert reply["error"]["code"] == code
        # Still usable afterwards.
        assert (await client.request("get_profile"))["user"]["user_id"] == "u"


async def test_frame_with_id_gets_its_id_back(server: Harness) -> None:
    async with server.connect("u") as client:
        reply = await client.request_raw({"type": 5, "data": {}})
        assert reply["error"]["code"] == "bad_frame"
        assert reply["id"] is not None
        reply = await client.request_raw({"type": "create_question", "data": [1]})
        assert reply["error"]["code"] == "bad_frame"


BAD_REQUESTS = [
    ("launch_rocket", {}, "unknown_op"),
    ("hello", {"token": "x"}, "already_authenticated"),
    ("create_question", {**question_data(), "title": ""}, "invalid_field"),
    ("create_question", {**question_data(), "title": 42}, "invalid_field"),
    ("create_question", {**question_data(), "title": "x" * 201}, "too_long"),
    ("create_question", {**question_data(), "body": "x" * 1001}, "too_long"),
    ("create_question", {**question_data(), "urgency": "panic"}, "invalid_field"),
    ("create_question", {**question_data(), "hashtags": ["a", "b", "c", "d", "e", "f"]}, "invalid_field"),
    ("create_question", {**question_data(), "hashtags": ["no spaces"]}, "invalid_field"),
    ("create_question", {**question_data(), "hashtags": "food"}, "invalid_field"),
    ("create_question", {**question_data(), "location": {"lat": math.nan, "lng": 126.5}}, "invalid_location"),
    ("create_question", {**question_data(), "location": {"lat": 33.5, "lng": math.inf}}, "invalid_location"),
    ("create_question", {**question_data(), "location": {"lat": 91.0, "lng": 126.5}}, "invalid_location"),
    ("create_question", {**question_data(), "location": {"lat": "33", "lng": 126.5}}, "invalid_location"),
    ("create_question", {**question_data(), "location": [33.5, 126.5]}, "invalid_location"),
    ("create_question", {**question_data(), "location": {"lat": 37.56, "lng": 126.97}}, "outside_service_area"),
    ("join_question", {}, "invalid_field"),
    ("join_question", {"question_id": 12}, "invalid_field"),
    ("join_question", {"question_id": "q-nope"}, "not_found"),
    ("create_answer", {"question_id": "q-nope", "content": "hi"}, "not_found"),
    ("mark_read", {"question_id": "q-nope"}, "not_found"),
    ("typing_start", {"question_id": "q-nope"}, "not_found"),
]


@pytest.mark.parametrize(
    "op, data, code", BAD_REQUESTS, ids=[f"{op}-{code}-{i}" for i, (op, _, code) in enumerate(BAD_REQUESTS)]
)
async def test_bad_requests_get_documented_codes(server: Harness, op: str, data: dict, code: str) -> None:  # type: ignore[type-arg]
    async with server.connect("u") as client:
        with pytest.raises(RequestError) as refused:
            await client.request(op, data)
        assert refused.value.code == code
        assert refused.value.message
        assert (await client.request("get_profile"))["user"]["user_id"] == "u"


@pytest.mark.parametrize("length", [201, 900])
async def test_too_long_names_the_documented_limit_however_long(server: Harness, length: int) -> None:
    # Past four times the limit the raw string is refused before its markup
    # is stripped: the reply still names the title's limit, 200, not 800.
    async with server.connect("u") as client:
        with pytest.raises(RequestError) as refused:
            await client.request("create_question", {**question_data(), "title": "x" * length})
        assert refused.value.code == "too_long"
        assert refused.value.error["field"] == "title"
        assert refused.value.error["max"] == 200
        assert "200 characters" in refused.value.message


async def test_oversize_frame_closes_with_1009_and_others_carry_on(server: Harness) -> None:
    async with server.connect("bystander") as bystander, server.connect("big") as big:
        await big.send_raw(msgpack.packb({"type": "get_profile", "id": 1, "data": {"pad": "x" * 70_000}}))
        with trio.fail_after(5):
            await big.wait_closed()
        assert big.closed is not None
        assert big.closed.reason.code == 1009
        assert (await bystander.request("get_profile"))["user"]["user_id"] == "bystander"


@pytest.mark.parametrize(
    "make_token, reason_part",
    [
        (lambda: None, "missing token"),
        (lambda: "not.a.jwt", "invalid token"),
        (lambda: token("u", now_s=0), "expired"),
        (lambda: token("u")[:-4] + "AAAA", "invalid token"),
        (lambda: _unsigned_none_token(), "invalid token"),  # alg: none
        (lambda: jwt.encode({"sub": "u", "exp": time.time() + 60}, SECRET, algorithm="HS512"), "invalid token"),
        (
            lambda: jwt.encode({"sub": "u", "exp": time.time() + 60}, "another-secret-0123456789-0123456789"),
            "invalid token",
        ),
        # A user id that is not valid Unicode: repaired, two ids could become one.
        (lambda: jwt.encode({"sub": "u\ud83d", "exp": time.time() + 60}, SECRET), "invalid token"),
    ],
    ids=["missing", "garbage", "expired", "forged", "alg-none", "wrong-alg", "wrong-secret", "lone-surrogate-sub"],
)
# The wrong-algorithm token must use the server's own secret (so only the
# algorithm is wrong); PyJWT warns that the key is short for HS512.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_bad_tokens_close_with_4001(server: Harness, make_token, reason_part: str) -> None:  # type: ignore[no-untyped-def]
    async with trio_websocket.open_websocket_url(server.url) as ws:
        data = {} if make_token() is None else {"token": make_token()}
        await ws.send_message(msgpack.packb({"type": "hello", "id": 1, "data": data}))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 4001
        assert reason_part in closed.value.reason.reason


async def test_lone_surrogates_in_a_tokens_nick_and_tags_are_repaired(server: Harness) -> None:
    """JSON can hold half an emoji (``JSON.stringify`` of a name cut short: ``"\\ud83d"``), which UTF-8 cannot:
    the nick and tags get U+FFFD in its place, the hello is stored, and the server goes on."""
    claims = {"nick": "Mina \ud83d", "tags": ["food\udc00"]}
    async with server.connect("emoji-fan", **claims) as fan, server.connect("bystander") as bystander:
        profile = (await fan.request("get_profile"))["user"]
        assert (profile["nick"], profile["tags"]) == ("Mina \ufffd", ["food\ufffd"])
        assert (await bystander.request("get_user", {"user_id": "emoji-fan"}))["user"]["nick"] == "Mina \ufffd"
    await server.running.clients.pipeline.wait_idle()
    [(nick, tags)] = db_rows(server.db, "SELECT nick, tags FROM users WHERE user_id = 'emoji-fan'")
    assert (nick, json.loads(tags)) == ("Mina \ufffd", ["food\ufffd"])


async def test_request_before_hello_closes_with_4001(server: Harness) -> None:
    async with trio_websocket.open_websocket_url(server.url) as ws:
        await ws.send_message(msgpack.packb({"type": "get_profile", "id": 1, "data": {}}))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 4001


async def test_user_text_arrives_in_one_unicode_form(server: Harness) -> None:
    """Decomposed Hangul (NFD), zero-width and control characters: stored and matched as NFC, counted after."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "맛집")
    assert nfd != "맛집" and len(nfd) == 6
    async with server.connect("asker") as asker, server.connect("jun", nick=unicodedata.normalize("NFD", "준")) as jun:
        letters = ("제주맛집추천부탁해요" * 20)[:197]
        title = unicodedata.normalize("NFD", letters) + "\u200b\x07"  # 197 letters, ~490 code points
        question = (await asker.request("create_question", question_data(title=title, hashtags=[f"#{nfd}"])))[
            "question"
        ]
        assert question["title"] == letters and question["hashtags"] == ["맛집"]
        found = await jun.request("browse_questions", {"hashtag": nfd})
        assert [q["question_id"] for q in found["questions"]] == [question["question_id"]]
        assert jun.hello["user"]["nick"] == "준"


async def test_a_reset_in_the_handshake_is_not_logged_as_a_failure(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Mobile clients drop in the middle of everything: a reset is logged as a lost connection, not an error."""
    h: Harness = await start_server()
    caplog.set_level(logging.INFO, logger="dongne")
    for _ in range(5):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", h.running.port))
        await sock.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a request
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with a reset
    with trio.fail_after(10):
        while len([r for r in caplog.records if r.msg == "connection_lost"]) < 5:  # noqa: ASYNC110 - the server's
            await trio.sleep(0.01)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    async with h.connect("after") as after:
        assert (await after.request("get_profile"))["user"]["user_id"] == "after"
