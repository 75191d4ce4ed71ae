"""A stage's alerts spliced from bytes packed once are exactly what msgpack makes of each alert."""

from __future__ import annotations

import msgpack

from dongne.core import AppendEvent, Send, SendEach
from dongne.core.fanout import StageAlerts
from dongne.core.protocol import durable_event

from .test_engine import T0, _crowd_engine, fire

BRIEF = {
    "question_id": "q1",
    "title": "흑돼지 맛집? " + "x" * 300,  # a str8/str16 header, non-ASCII
    "location": {"lat": 33.4996, "lng": 126.5312},
    "region": "Jeju-si",
    "hashtags": ["food", "blackpork"],
    "urgency": "urgent",
    "created_at": T0,
    "asker_nick": "Mina",
}


def test_each_alert_is_packed_as_msgpack_packs_its_dict() -> None:
    alerts = StageAlerts("new_question_notification", "q1", BRIEF, "QUICK", ("critical", "urgent", "strong"))
    for distance in (0.0, 12.5, 4999.999999, None):
        for seq in (1, 127, 128, 65536, 2**40):
            data, packed = alerts.data(distance)

            assert msgpack.packb(data) == packed
            assert msgpack.packb(durable_event("new_question_notification", seq, data)) == alerts.frame(seq, packed)
            assert list(data) == ["question_id", "question", "distance_m", "stage", "priority", "sound", "vibration"]


def test_a_stage_writes_and_sends_what_its_dicts_say() -> None:
    """Every alert of a QUICK batch: the inbox row's bytes and the frame's bytes decode to the event's dicts."""
    sim, _, qid = _crowd_engine(alerts_per_batch=100)
    out = fire(sim.engine, qid, T0 + 3000)
    events = [w for w in out.writes if isinstance(w, AppendEvent)]
    (sends,) = [a for a in out.actions if isinstance(a, SendEach)]  # the batch is one action

    assert not [a for a in out.actions if isinstance(a, Send)]
    assert sends.kind == "new_question_notification"
    assert len(events) == len(sends.frames) == 100
    for event, (conn_ids, seq, packed) in zip(events, sends.frames, strict=True):
        assert seq == event.seq
        data = event.event_data()
        assert event.data is None and msgpack.packb(data) == event.packed
        assert msgpack.unpackb(packed) == durable_event("new_question_notification", event.seq, data)
        assert msgpack.packb(msgpack.unpackb(packed)) == packed
        assert conn_ids == tuple(sorted(sim.engine.user_conns[event.user_id]))
        assert data["stage"] == "QUICK" and data["question"]["question_id"] == qid
