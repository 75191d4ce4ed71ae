"""A client that stops reading is closed with 4009; nobody else waits for it."""

from __future__ import annotations

import trio

from .conftest import question_data, token
from .rawws import RawWebSocket


async def test_stalled_client_is_closed_and_recovers_by_resume(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(server={"outbound_buffer_bytes": 65536}, store={"synchronous": "NORMAL"})
    async with h.connect("asker") as asker, h.connect("reader") as reader, h.connect("writer") as writer:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await reader.request("join_question", {"question_id": qid})

        # A second connection of the asker's stops reading: it is in the room
        # and receives every durable answer_notification.
        stalled = await RawWebSocket.connect(h.running.port, rcvbuf=4096)
        await stalled.send({"type": "hello", "id": 1, "data": {"token": token("asker")}})
        await stalled.send({"type": "join_question", "id": 2, "data": {"question_id": qid}})
        await asker.next_event("user_online")  # the reader
        await asker.request("get_profile")

        content = " ".join(f"w{i}" for i in range(400))[:1900]  # no long repeats: that is spam
        sent = 0
        with trio.fail_after(60):
            while (
                4009 not in h.running.clients.statistics().errors
                and h.running.clients.statistics().slow_consumers == 0
                and sent < 4000
            ):
                await writer.request("create_answer", {"question_id": qid, "content": f"{sent} {content}"})
                sent += 1
                # Everyone else keeps up: the reader sees each broadcast at once.
                got = await reader.next_event("new_answer", timeout=5)
                assert got["data"]["answer"]["content"].startswith(f"{sent - 1} ")
        assert h.running.clients.statistics().slow_consumers == 1
        frames = await stalled.read_until_closed()
        assert stalled.close_code == 4009
        assert len(frames) < 2 * sent
        stalled.close()
        # The asker's live connection got everything, in order.
        live = [e for e in asker.pending_events() if e["type"] == "answer_notification"]
        assert [e["seq"] for e in live] == list(range(1, sent + 1))
    # Reconnecting with resume recovers every durable event, once, in order.
    async with h.connect("asker", resume_from=0) as again:
        replayed = [await again.next_event("answer_notification") for _ in range(sent)]
        assert [e["seq"] for e in replayed] == list(range(1, sent + 1))
        assert again.pending_events() == []
    await h.running.aclose()
