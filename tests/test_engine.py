"""The sans-I/O engine: exact rules and timings, no sockets, explicit ``now``."""

from __future__ import annotations

import itertools

import msgpack
import pytest

from dongne.core import (
    AddPoints,
    Answer,
    AppendEvent,
    Claims,
    Close,
    CloseConnection,
    CloseOnce,
    Connected,
    CoreSettings,
    CountAnswer,
    Disconnected,
    Engine,
    EngineSettings,
    EnqueuePush,
    EscalationDue,
    FrameReceived,
    LimitSettings,
    Outcome,
    Question,
    QuestionLoaded,
    ReadDone,
    Replay,
    RoomNews,
    SaveAnswer,
    SaveNotified,
    SaveUser,
    Send,
    SendEach,
    SeqsMoved,
    StagePlan,
    Tick,
    User,
    UsersChanged,
)
from dongne.core.lifecycle import TRANSITIONS, IllegalTransition, QuestionEvent, QuestionStatus, advance
from dongne.core.reads import AnswerHome, ModerationItem
from dongne.core.records import ReceiptState
from dongne.store import Storage

T0 = 1_800_000_000_000


def claims_for(token: object, now_s: float) -> Claims:
    if not isinstance(token, str) or not token.startswith("ok:"):
        raise CloseConnection(4001, "invalid token")
    return Claims(user_id=token[3:], nick=token[3:].title(), local=False, tags=(), role="user")


def make_engine(**settings: object) -> Engine:
    counter = itertools.count(1)
    return Engine(
        CoreSettings(engine=EngineSettings(**settings)),  # type: ignore[arg-type]
        claims_for,
        new_id=lambda prefix, now: f"{prefix}{next(counter)}",
    )


def frame(op: str, rid: int, data: dict) -> bytes:  # type: ignore[type-arg]
    return msgpack.packb({"type": op, "id": rid, "data": data})


def send(engine: Engine, conn_id: int, op: str, data: dict, now: int = T0, rid: int = 1) -> Outcome:  # type: ignore[type-arg]
    """One request as the driver feeds it (a question it asks for is not in the store)."""
    outcome = engine.handle(FrameReceived(conn_id, frame(op, rid, data)), now)
    if outcome.load_question is not None:
        outcome = engine.handle(QuestionLoaded(conn_id, None), now)
    return outcome


def fire(engine: Engine, question_id: str, now: int) -> Outcome:
    return engine.handle(EscalationDue(question_id), now)


def tick(engine: Engine, now: int) -> Outcome:
    return engine.handle(Tick(), now)


class Sim:
    """Drives an engine like the server does, collecting what each connection would receive."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbox: dict[int, list[dict]] = {}  # type: ignore[type-arg]
        self.ids = itertools.count(1)

    def connect(self, conn_id: int, user: str, now: int = T0) -> Outcome:
        self.engine.handle(Connected(conn_id), now)
        return self.call(conn_id, "hello", {"token": f"ok:{user}"}, now)

    def call(self, conn_id: int, op: str, data: dict, now: int = T0) -> Outcome:  # type: ignore[type-arg]
        outcome = send(self.engine, conn_id, op, data, now, next(self.ids))
        self.deliver(outcome)
        return outcome

    def deliver(self, outcome: Outcome) -> None:
        for action in outcome.actions:
            if isinstance(action, Send):
                for c in action.conn_ids:
                    self.inbox.setdefault(c, []).append(action.frame)
            elif isinstance(action, SendEach):
                for conn_ids, _seq, packed in action.frames:
                    for c in conn_ids:
                        self.inbox.setdefault(c, []).append(msgpack.unpackb(packed))

    def take(self, conn_id: int) -> list[dict]:  # type: ignore[type-arg]
        return self.inbox.pop(conn_id, [])

    def reply(self, outcome: Outcome) -> dict:  # type: ignore[type-arg]
        first = outcome.actions[0]
        assert isinstance(first, Send) and first.frame["type"] == "reply"
        return first.frame


def ask(sim: Sim, conn_id: int = 1, now: int = T0) -> str:
    out = sim.call(conn_id, "create_question", {"title": "t", "location": {"lat": 33.5, "lng": 126.5}}, now)
    return str(sim.reply(out)["data"]["question"]["question_id"])


def connect_admin(sim: Sim, conn_id: int, user: str = "admin") -> None:
    """Connect ``user`` as an admin: the role (claims_for gives none) and the oversight's list of admins."""
    sim.connect(conn_id, user)
    sim.engine.users[user].role = "admin"
    sim.engine.oversight.role_is(sim.engine.users[user])


def local_in_the_room(sim: Sim) -> str:
    """The asker (connection 1) asks; the local (connection 2) joins the question's room. Returns its id."""
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    sim.call(2, "join_question", {"question_id": qid})
    return qid


def test_transition_table_is_the_whole_lifecycle() -> None:
    for status in QuestionStatus:
        for event in QuestionEvent:
            if (status, event) in TRANSITIONS:
                assert advance(status, event) == TRANSITIONS[(status, event)]
            else:
                with pytest.raises(IllegalTransition):
                    advance(status, event)
    assert advance(QuestionStatus.ANSWERED, QuestionEvent.ACCEPT) == QuestionStatus.RESOLVED


def test_first_frame_must_be_hello() -> None:
    engine = make_engine()
    engine.handle(Connected(1), T0)
    closed = send(engine, 1, "get_profile", {})
    assert closed.actions == (Close(1, 4001, "the first frame must be hello"),)
    assert closed.error == "close_4001"
    # The connection is closing: what it sends next is ignored, even a valid hello.
    assert send(engine, 1, "hello", {"token": "ok:mina"}) == Outcome()
    engine.handle(Connected(2), T0)
    forged = send(engine, 2, "hello", {"token": "forged"})
    assert forged.actions == (Close(2, 4001, "invalid token"),)


def test_hello_creates_the_user_once_and_refreshes_claims() -> None:
    sim = Sim(make_engine())
    first = sim.connect(1, "mina")
    assert [type(w) for w in first.writes] == [SaveUser]
    again = sim.connect(2, "mina")
    assert again.writes == ()  # same claims, nothing to write


def test_ping_answers_with_the_server_time_and_writes_nothing() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "mina")
    pinged = sim.call(1, "ping", {}, T0 + 1234)
    assert pinged.writes == ()
    assert sim.reply(pinged) == {
        "type": "reply",
        "id": pinged.request[1],
        "ok": True,
        "data": {"server_time": T0 + 1234},
    }


def test_durable_events_get_consecutive_seqs_and_a_row_each() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    outs = [sim.call(2, "create_answer", {"question_id": qid, "content": f"a{i}"}, T0 + i) for i in range(3)]
    appended = [w for o in outs for w in o.writes if isinstance(w, AppendEvent)]
    assert [(w.user_id, w.seq) for w in appended] == [("asker", 1), ("asker", 2), ("asker", 3)]
    notes = [f for f in sim.take(1) if f["type"] == "answer_notification"]
    assert [f["seq"] for f in notes] == [1, 2, 3]
    # Each outcome persists the answer, counts it (in SQL) and the inbox row (which records last_seq), and
    # announces the answer to the room's members on other nodes.
    assert {type(w) for w in outs[0].writes} == {SaveAnswer, CountAnswer, AppendEvent, RoomNews}


def test_resume_asks_for_a_replay_of_exactly_the_gap() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    for i in range(5):
        sim.call(2, "create_answer", {"question_id": qid, "content": f"a{i}"})
    sim.engine.handle(Connected(3), T0)
    out = sim.call(3, "hello", {"token": "ok:asker", "resume": {"last_seq": 2}})
    assert Replay(3, "asker", 2, 5) in out.actions
    assert sim.reply(out)["data"]["last_seq"] == 5
    sim.engine.handle(Connected(4), T0)
    up_to_date = sim.call(4, "hello", {"token": "ok:asker", "resume": {"last_seq": 5}})
    # Nothing to replay: the empty replay only says where the connection starts.
    assert [a for a in up_to_date.actions if isinstance(a, Replay)] == [Replay(4, "asker", 5, 5)]
    sim.engine.handle(Connected(5), T0)
    fresh = sim.call(5, "hello", {"token": "ok:asker"})
    assert [a for a in fresh.actions if isinstance(a, Replay)] == [Replay(5, "asker", 5, 5)]


def test_seqs_moved_sets_each_users_next_seq() -> None:
    """Heads another writer moved, up (news) or down (refused commits counted in memory), set last_seq."""
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    sim.call(2, "create_answer", {"question_id": qid, "content": "a0"})
    assert sim.engine.users["asker"].last_seq == 1

    assert sim.engine.handle(SeqsMoved({"asker": 7, "nobody": 3}), T0) == Outcome()
    out = sim.call(2, "create_answer", {"question_id": qid, "content": "a1"})
    assert [(w.user_id, w.seq) for w in out.writes if isinstance(w, AppendEvent)] == [("asker", 8)]
    assert "nobody" not in sim.engine.users

    sim.engine.handle(SeqsMoved({"asker": 4}), T0)
    out = sim.call(2, "create_answer", {"question_id": qid, "content": "a2"})

    assert [(w.user_id, w.seq) for w in out.writes if isinstance(w, AppendEvent)] == [("asker", 5)]


def test_typing_expires_exactly_at_its_ttl() -> None:
    sim = Sim(make_engine(typing_ttl_s=3.0))
    qid = local_in_the_room(sim)
    sim.take(1)
    sim.call(2, "typing_start", {"question_id": qid}, T0 + 1000)
    assert [f["type"] for f in sim.take(1)] == ["user_typing"]
    assert sim.engine.next_deadline() == T0 + 4000
    sim.deliver(tick(sim.engine, T0 + 3999))
    assert sim.take(1) == []
    # A refresh before expiry pushes the deadline and sends nothing new.
    sim.call(2, "typing_start", {"question_id": qid}, T0 + 3500)
    assert sim.take(1) == []
    sim.deliver(tick(sim.engine, T0 + 4000))  # the stale deadline does nothing
    assert sim.take(1) == []
    sim.deliver(tick(sim.engine, T0 + 6499))
    assert sim.take(1) == []
    sim.deliver(tick(sim.engine, T0 + 6500))
    assert [f["type"] for f in sim.take(1)] == ["user_stop_typing"]
    assert sim.engine.presence.rooms[qid].typing == {}


def test_a_renewed_or_stopped_typing_state_leaves_no_deadline_behind() -> None:
    sim = Sim(make_engine(typing_ttl_s=3.0))
    qid = local_in_the_room(sim)
    sim.call(2, "typing_start", {"question_id": qid}, T0 + 1000)
    sim.call(2, "typing_start", {"question_id": qid}, T0 + 2000)
    sim.call(2, "typing_start", {"question_id": qid}, T0 + 2500)

    assert sim.engine.next_deadline() == T0 + 5500  # not the renewed ones' T0 + 4000 and 5000
    sim.call(2, "typing_stop", {"question_id": qid}, T0 + 3000)
    assert sim.engine.next_deadline() == T0 + 600_000  # the question's slow-response alert: no typing left


def test_disconnect_stops_typing_and_announces_offline() -> None:
    sim = Sim(make_engine())
    qid = local_in_the_room(sim)
    sim.call(2, "typing_start", {"question_id": qid})
    sim.take(1)
    sim.deliver(sim.engine.handle(Disconnected(2), T0))
    assert [f["type"] for f in sim.take(1)] == ["user_stop_typing", "user_offline"]
    assert "local" not in sim.engine.user_conns


def test_receipts_move_forward_only() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    qid = ask(sim)
    sim.deliver(sim.engine.handle(Disconnected(1), T0))
    sim.connect(2, "local")
    aid = sim.reply(sim.call(2, "create_answer", {"question_id": qid, "content": "x"}))["data"]["answer"]["answer_id"]
    assert sim.engine.answers[qid][aid].state == "sent"
    sim.take(2)
    sim.connect(3, "asker", now=T0 + 10)
    receipts = [f for f in sim.take(2) if f["type"] == "receipt"]
    assert [r["data"]["state"] for r in receipts] == ["delivered"]
    assert receipts[0]["data"]["at"] == T0 + 10
    sim.call(3, "mark_read", {"question_id": qid}, T0 + 20)
    assert [f["data"]["state"] for f in sim.take(2) if f["type"] == "receipt"] == ["read"]
    sim.connect(4, "asker", now=T0 + 30)  # a later hello does not demote 'read'
    assert sim.engine.answers[qid][aid].state == "read"
    assert [f for f in sim.take(2) if f["type"] == "receipt"] == []


def test_accept_awards_configured_points() -> None:
    sim = Sim(make_engine(accept_points=25))
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    aid = sim.reply(sim.call(2, "create_answer", {"question_id": qid, "content": "x"}))["data"]["answer"]["answer_id"]
    out = sim.call(1, "accept_answer", {"question_id": qid, "answer_id": aid})
    assert [w for w in out.writes if isinstance(w, AddPoints)] == [AddPoints("local", 25)]  # added in SQL
    assert not [w for w in out.writes if isinstance(w, SaveUser) and w.user.user_id == "local"]
    assert sim.engine.users["local"].points == 25


def test_escalation_stages_fire_at_their_offsets_exactly() -> None:
    from dongne.core.effects import CancelEscalation, SaveEscalation, StartEscalation

    sim = Sim(make_engine())
    sim.connect(1, "asker")
    for conn_id, (user, lng) in enumerate((("near", 126.5420), ("mid", 126.5740)), start=2):
        sim.engine.handle(Connected(conn_id), T0)
        send(sim.engine, conn_id, "hello", {"token": f"ok:{user}"})
        sim.engine.users[user].local = True
        sim.engine.where.refresh_local(sim.engine.users[user], T0)
        sim.call(conn_id, "update_location", {"location": {"lat": 33.4996, "lng": lng}})
    created = sim.call(1, "create_question", {"title": "t", "location": {"lat": 33.4996, "lng": 126.5312}})
    qid = sim.reply(created)["data"]["question"]["question_id"]
    assert StartEscalation(qid, T0 + 120_000) in created.actions  # the default plan's last stage is at 120 s
    assert [f["data"]["stage"] for f in sim.take(2) if f["type"] == "new_question_notification"] == ["IMMEDIATE"]
    assert sim.engine.escalation_due(qid) == T0 + 3000
    assert fire(sim.engine, qid, T0 + 2999).writes == ()
    quick = fire(sim.engine, qid, T0 + 3000)
    sim.deliver(quick)
    assert SaveEscalation(qid, 2, T0 + 3000) in quick.writes
    assert [f["data"]["stage"] for f in sim.take(3) if f["type"] == "new_question_notification"] == ["QUICK"]
    assert sim.engine.escalation_due(qid) == T0 + 30_000
    # An answer, then FINAL finds nobody; accepting cancels what is left.
    aid = sim.reply(sim.call(2, "create_answer", {"question_id": qid, "content": "x"}))["data"]["answer"]["answer_id"]
    sim.deliver(fire(sim.engine, qid, T0 + 120_000))
    assert sim.engine.escalation_due(qid) is None
    assert [f for c in (2, 3) for f in sim.take(c) if f["type"] == "new_question_notification"] == []
    accepted = sim.call(1, "accept_answer", {"question_id": qid, "answer_id": aid})
    assert CancelEscalation(qid) not in accepted.actions  # nothing was left to cancel


def test_accept_cancels_remaining_stages() -> None:
    from dongne.core.effects import CancelEscalation

    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "helper")
    qid = ask(sim)
    aid = sim.reply(sim.call(2, "create_answer", {"question_id": qid, "content": "x"}))["data"]["answer"]["answer_id"]
    accepted = sim.call(1, "accept_answer", {"question_id": qid, "answer_id": aid}, T0 + 1000)
    assert CancelEscalation(qid) in accepted.actions
    assert sim.engine.escalation_due(qid) is None
    assert fire(sim.engine, qid, T0 + 200_000).writes == ()


def _crowd_claims(token: object, now_s: float) -> Claims:
    user = str(token)[3:]
    return Claims(user_id=user, nick=user, local=user.startswith("local"), tags=(), role="user")


def _crowd_engine(alerts_per_batch: int) -> tuple[Sim, list[Outcome], str]:
    """An asker and 250 online locals 10-2500 m east of the question (all in QUICK's 5 km)."""
    engine = Engine(CoreSettings(alerts_per_batch=alerts_per_batch), _crowd_claims)
    sim = Sim(engine)
    log = [sim.connect(1, "asker")]
    for n in range(250):
        log.append(sim.connect(100 + n, f"local{n:03}"))
        lng = 126.5312 + (10 + 10 * n) / 92_800  # ~10 m apart, nearest is local000
        log.append(sim.call(100 + n, "update_location", {"location": {"lat": 33.4996, "lng": lng}}))
    created = sim.call(1, "create_question", {"title": "t", "location": {"lat": 33.4996, "lng": 126.5312}})
    log.append(created)
    return sim, log, sim.reply(created)["data"]["question"]["question_id"]


def _alerted(outcome: Outcome) -> list[tuple[str, str, float]]:
    """(user, stage, distance_m) of each alert written, in order."""
    from dongne.core.effects import AppendEvent

    return [
        (w.user_id, w.event_data()["stage"], w.event_data()["distance_m"])
        for w in outcome.writes
        if isinstance(w, AppendEvent) and w.type == "new_question_notification"
    ]


def test_a_wide_stage_is_delivered_in_batches_nearest_first() -> None:
    from dongne.core.effects import SaveEscalation

    sim, _, qid = _crowd_engine(alerts_per_batch=100)
    at = T0 + 3000
    batches = []
    while sim.engine.escalation_due(qid) == T0 + 3000:
        out = fire(sim.engine, qid, at)
        batches.append(out)
        at += 7  # later calls deliver the same stage, wherever the clock is
    sizes = [len(_alerted(b)) for b in batches]
    assert sizes == [100, 100, 40]  # 250 locals, 10 had IMMEDIATE
    # The stage's progress is saved with its last batch only.
    assert [any(isinstance(w, SaveEscalation) for w in b.writes) for b in batches] == [False, False, True]
    alerts = [a for b in batches for a in _alerted(b)]
    assert {stage for _, stage, _ in alerts} == {"QUICK"}
    assert len({user for user, _, _ in alerts}) == 240
    assert [d for _, _, d in alerts] == sorted(d for _, _, d in alerts)
    assert [user for user, _, _ in alerts][:2] == ["local010", "local011"]
    assert sim.engine.escalation_due(qid) == T0 + 30_000


def test_a_restart_in_the_middle_of_a_stage_alerts_only_the_rest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dongne.store import Store

    sim, log, qid = _crowd_engine(alerts_per_batch=100)
    first = fire(sim.engine, qid, T0 + 3000)
    store = Store(tmp_path / "mid.sqlite3", synchronous="NORMAL")
    store.open()
    store.commit(store.prepare([w for outcome in (*log, first) for w in outcome.writes]))
    store.close()  # the process dies before the second batch is committed

    store = Store(tmp_path / "mid.sqlite3", synchronous="NORMAL")
    store.open()
    state = store.load(hot_since=0)
    store.close()
    engine = Engine(CoreSettings(alerts_per_batch=100), _crowd_claims)
    engine.load(state, T0 + 4000)
    # Positions are live, not stored: the locals come back online where they were.
    resumed = Sim(engine)
    for n in range(250):
        resumed.connect(100 + n, f"local{n:03}", T0 + 4000)
        lng = 126.5312 + (10 + 10 * n) / 92_800
        resumed.call(100 + n, "update_location", {"location": {"lat": 33.4996, "lng": lng}}, T0 + 4000)
    assert engine.escalation_due(qid) == T0 + 3000  # the stage is still due: it was not finished
    rest = []
    while engine.escalation_due(qid) == T0 + 3000:
        rest.extend(_alerted(fire(engine, qid, T0 + 4000)))
    before = {user for user, _, _ in _alerted(first)}
    after = {user for user, _, _ in rest}
    assert len(before) == 100 and len(after) == 140
    assert not before & after  # nobody twice
    assert engine.escalation_due(qid) == T0 + 30_000


def test_nearby_questions_looks_past_a_crowd_of_ones_own() -> None:
    engine = Engine(CoreSettings(limits=LimitSettings(questions_burst=50, writes_burst=50)), claims_for)
    sim = Sim(engine)
    for conn_id, user in ((1, "busy"), (2, "other"), (3, "walker")):
        sim.connect(conn_id, user)
    # "busy" asks 12 questions 10-120 m from the hall; "other" one 2 km away.
    for n in range(12):
        sim.call(
            1,
            "create_question",
            {"title": f"q{n}", "location": {"lat": 33.4996, "lng": 126.5312 + (10 + 10 * n) / 92_800}},
        )
    far = sim.call(
        2, "create_question", {"title": "far", "location": {"lat": 33.4996, "lng": 126.5312 + 2000 / 92_800}}
    )
    far_id = sim.reply(far)["data"]["question"]["question_id"]
    hall = {"location": {"lat": 33.4996, "lng": 126.5312}}

    own_excluded = sim.reply(sim.call(1, "nearby_questions", hall))["data"]["questions"]
    assert [q["question_id"] for q in own_excluded] == [far_id]  # past the 12 nearest, all its own
    seen = sim.reply(sim.call(3, "nearby_questions", hall))["data"]["questions"]
    assert [q["title"] for q in seen] == ["q0", "q1", "q2", "q3", "q4"]
    assert [q["distance_m"] for q in seen] == sorted(q["distance_m"] for q in seen)


def test_a_slow_response_alert_and_the_dashboard_agree_on_the_stage_reached() -> None:
    """Before its first stage runs, a question has reached no stage: the alert and the dashboard both say None."""
    from dongne.core import AlertSettings, StagePlan

    late = StagePlan("LATE", 600.0, None, None, "everyone")
    engine = Engine(CoreSettings(stages=(late,), alerts=AlertSettings(slow_response_s=5.0)), claims_for)
    sim = Sim(engine)
    connect_admin(sim, 1)
    sim.connect(2, "asker")
    qid = ask(sim, 2)
    alert = tick(engine, T0 + 5000)
    raised = [w for w in alert.writes if isinstance(w, AppendEvent) and w.type == "slow_response_alert"]

    assert [w.data["stage"] for w in raised] == [None]
    assert [q["stage"] for q in engine.overview(T0 + 5000)["open"] if q["question_id"] == qid] == [None]
    fire(engine, qid, T0 + 600_000)
    assert engine.overview(T0 + 600_000)["open"][0]["stage"] == "LATE"


def test_a_slow_response_alert_counts_the_locals_alerted_after_every_stage_has_run() -> None:
    """The default plan's last stage runs at 120 s, the alert at 600 s: the count outlives the escalation."""
    from dongne.core import AlertSettings

    engine = Engine(CoreSettings(alerts=AlertSettings(slow_response_s=600.0)), claims_for)
    sim = Sim(engine)
    connect_admin(sim, 1)
    sim.connect(2, "asker")
    for conn_id, lng in enumerate((126.5320, 126.5420, 126.5740), start=3):  # 1 km, 10 km: IMMEDIATE and QUICK
        user = f"local{conn_id}"
        sim.connect(conn_id, user)
        engine.users[user].local = True
        engine.where.refresh_local(engine.users[user], T0)
        sim.call(conn_id, "update_location", {"location": {"lat": 33.4996, "lng": lng}})
    created = sim.call(2, "create_question", {"title": "t", "location": {"lat": 33.4996, "lng": 126.5312}})
    qid = sim.reply(created)["data"]["question"]["question_id"]
    for due in (3000, 30_000, 120_000):
        sim.deliver(fire(engine, qid, T0 + due))
    assert engine.escalation_due(qid) is None  # every stage has run
    alerted = {c for c in (3, 4, 5) if any(f["type"] == "new_question_notification" for f in sim.take(c))}
    assert len(alerted) >= 2

    raised = [w for w in tick(engine, T0 + 600_000).writes if isinstance(w, AppendEvent)]
    assert [(w.type, w.data["stage"], w.data["notified"]) for w in raised] == [
        ("slow_response_alert", "FINAL", len(alerted))
    ]


def test_the_dashboard_lists_the_newest_open_questions_and_counts_them_all() -> None:
    from dongne.core.oversight import OPEN_LISTED

    regions = {126.5: "West", 126.6: "East"}  # by longitude, for this test
    sim = Sim(Engine(CoreSettings(), claims_for, region_of=lambda lat, lng: regions.get(lng)))
    asked = OPEN_LISTED + 5
    for n in range(asked):
        if n % 5 == 0:  # within each asker's question burst
            sim.connect(n // 5 + 1, f"asker{n // 5}")
        location = {"lat": 33.5, "lng": 126.5 if n % 3 else 126.6}
        sim.call(n // 5 + 1, "create_question", {"title": f"q{n}", "location": location}, T0 + n)
    overview = sim.engine.overview(T0 + asked)

    assert len(overview["open"]) == OPEN_LISTED and overview["open_questions"] == asked
    assert overview["open"][-1]["created_at"] == T0 + asked - 1  # the newest kept
    assert overview["open_by_region"] == {"East": 69, "West": 136}  # every third asked in the East


def test_an_escalation_not_begun_is_stored_and_taken_up_after_a_restart(store: Storage) -> None:
    """A plan whose first stage comes later (no IMMEDIATE): the question's commit stores its escalation as
    not begun, so an engine loaded from the store after a restart starts it (a restart before the first
    stage lost it: only a stage run wrote the escalation's row)."""
    from dongne.core import StagePlan, StartEscalation

    settings = CoreSettings(stages=(StagePlan("LATER", 30.0, 5_000.0, None, "nearby"),))
    sim = Sim(Engine(settings, claims_for))
    hello = sim.connect(1, "asker")
    created = sim.call(1, "create_question", {"title": "t", "location": {"lat": 33.5, "lng": 126.5}})
    qid = sim.reply(created)["data"]["question"]["question_id"]
    store.apply([*hello.writes, *created.writes])  # as the server commits them, before the replies

    restarted = Engine(settings, claims_for).load(store.load(hot_since=0), T0 + 1000)
    assert [a.question_id for a in restarted.actions if isinstance(a, StartEscalation)] == [qid]


def test_a_local_whose_ban_ran_out_is_alerted_again_without_coming_back_first(store: Storage) -> None:
    """Banned until +60 s and offline: from the ban's end the local's home position counts again, and in a
    server started after it (a ban that ran out was only cleared by the user's next hello)."""
    from dongne.core import Disconnected as Gone

    engine = make_engine()
    sim = Sim(engine)
    writes = [*sim.connect(1, "admin").writes]
    engine.users["admin"].role = "admin"
    writes += sim.connect(2, "local").writes
    engine.users["local"].local = True
    writes += sim.call(2, "update_settings", {"home": {"lat": 33.4996, "lng": 126.5420}}).writes  # 1 km east
    writes += sim.call(1, "ban_user", {"user_id": "local", "reason": "spam", "until": T0 + 60_000}).writes
    engine.handle(Gone(2), T0)
    store.apply(writes)
    sim.connect(3, "asker", T0 + 20_000)

    def quick_alerted(asked_at: int) -> list[str]:
        question = {"title": f"t{asked_at}", "location": {"lat": 33.4996, "lng": 126.5312}}
        qid = sim.reply(sim.call(3, "create_question", question, asked_at))["data"]["question"]["question_id"]
        quick = fire(engine, qid, asked_at + 3000)
        return [w.user_id for w in quick.writes if isinstance(w, AppendEvent) and w.type == "new_question_notification"]

    assert quick_alerted(T0 + 30_000) == []  # banned still
    assert quick_alerted(T0 + 100_000) == ["local"]  # the ban ended at +60 s: no event needed then
    restarted = make_engine()
    restarted.load(store.load(hot_since=0), T0 + 100_000)
    assert "local" in restarted.where.locals


def _asked_then_banned(engine: Engine, store: Storage) -> str:
    """An asker's question, then an admin's ban of the asker until +60 s, stored: the question's id."""
    sim = Sim(engine)
    writes = [*sim.connect(1, "admin").writes]
    engine.users["admin"].role = "admin"
    writes += sim.connect(2, "asker").writes
    created = sim.call(2, "create_question", {"title": "t", "location": {"lat": 33.5, "lng": 126.5}})
    qid: str = sim.reply(created)["data"]["question"]["question_id"]
    banned = sim.call(1, "ban_user", {"user_id": "asker", "reason": "spam", "until": T0 + 60_000})
    store.apply([*writes, *created.writes, *banned.writes])
    return qid


def test_a_ban_stops_the_askers_escalations_for_good_a_restart_after_it_included(store: Storage) -> None:
    """Banned until +60 s: the question's escalation stops and is stored as done, so an engine loaded from
    the store after the ban's end does not take it up again (it did: only memory knew)."""
    from dongne.core import StartEscalation

    engine = make_engine()
    qid = _asked_then_banned(engine, store)

    assert engine.escalation_due(qid) is None
    restarted = make_engine().load(store.load(hot_since=0), T0 + 100_000)
    assert [a for a in restarted.actions if isinstance(a, StartEscalation)] == []


@pytest.mark.backends("sqlite", "postgres")
def test_a_ban_stops_the_askers_escalations_for_good_a_longer_plan_after_it_included(store: Storage) -> None:
    """A two-stage plan, the asker banned until +60 s after IMMEDIATE: stored as "done", the count of the
    plan's stages (2), it was taken up again by a server started after the ban's end with the four-stage
    plan (EXTENDED, FINAL). Stored as stopped, whatever the plan: not, and its alert names IMMEDIATE."""
    from dongne.core import StartEscalation

    qid = _asked_then_banned(Engine(CoreSettings(stages=TWO_STAGES), claims_for), store)

    restarted = make_engine()
    started = restarted.load(store.load(hot_since=0), T0 + 100_000)
    connect_admin(Sim(restarted), 5)

    assert [a for a in started.actions if isinstance(a, StartEscalation)] == []
    assert restarted.escalation_due(qid) is None and restarted.follows_escalation(qid)
    assert _slow_response_alert(restarted, T0 + 600_000)["stage"] == "IMMEDIATE"


TWO_STAGES = (
    StagePlan("IMMEDIATE", 0.0, 2_000.0, 10, "online_nearby", requires_immediate_alerts=True, priority="high"),
    StagePlan("QUICK", 3.0, 5_000.0, None, "nearby", cap_share=0.75),
)


def _slow_response_alert(engine: Engine, now: int) -> dict:  # type: ignore[type-arg]
    [alert] = [
        w.data for w in tick(engine, now).writes if isinstance(w, AppendEvent) and w.type == "slow_response_alert"
    ]
    return alert  # type: ignore[no-any-return]


@pytest.mark.backends("sqlite", "postgres")
def test_a_plan_shortened_before_a_restart_leaves_its_open_questions_at_its_last_stage(store: Storage) -> None:
    """Four stages run, then the plan keeps two (config.toml) and the server starts again: the open question
    has run every stage, and its slow-response alert and the admin overview name the new plan's last (the
    stored count, 4, was read as an index into the plan: IndexError)."""
    from dongne.core import StartEscalation

    engine = make_engine()
    sim = Sim(engine)
    writes = [*sim.connect(1, "asker").writes]
    created = sim.call(1, "create_question", {"title": "t", "location": {"lat": 33.4996, "lng": 126.5312}})
    qid = sim.reply(created)["data"]["question"]["question_id"]
    writes += created.writes
    for at in (3_000, 30_000, 120_000):
        writes += fire(engine, qid, T0 + at).writes
    store.apply(writes)

    restarted = Engine(CoreSettings(stages=TWO_STAGES), claims_for)
    started = restarted.load(store.load(hot_since=0), T0 + 200_000)
    connect_admin(Sim(restarted), 5)

    assert [a for a in started.actions if isinstance(a, StartEscalation)] == []
    assert restarted.escalation_due(qid) is None
    assert [q["stage"] for q in restarted.overview(T0 + 200_000)["open"]] == ["QUICK"]
    assert _slow_response_alert(restarted, T0 + 600_000)["stage"] == "QUICK"


def test_a_slow_response_alert_names_the_last_stage_run_before_a_ban_stopped_the_escalation() -> None:
    """PROTOCOL: ``stage`` is the last stage run. The asker banned at 1 s, only IMMEDIATE ran: the alert
    said FINAL, the plan's last, as for an escalation that ran them all."""
    engine = make_engine()
    sim = Sim(engine)
    connect_admin(sim, 1)
    sim.connect(2, "asker")
    qid = ask(sim, 2)
    sim.call(1, "ban_user", {"user_id": "asker", "reason": "spam", "until": T0 + 30_000}, T0 + 1_000)

    alert = _slow_response_alert(engine, T0 + 600_000)
    assert (alert["question_id"], alert["stage"], alert["notified"]) == (qid, "IMMEDIATE", None)


def test_a_question_whose_only_answer_is_deleted_is_open_again_and_owed_its_alert() -> None:
    """Open means no answer yet: deleting the only answer reopens the question, and the slow-response
    alert at 600 s still comes (a deleted spam answer must not silence it)."""
    from dongne.core import AlertSettings

    engine = Engine(CoreSettings(alerts=AlertSettings(slow_response_s=600.0)), claims_for)
    sim = Sim(engine)
    connect_admin(sim, 1)
    sim.connect(2, "asker")
    sim.connect(3, "spammer")
    qid = ask(sim, 2)
    sim.call(3, "join_question", {"question_id": qid})
    created = sim.call(3, "create_answer", {"question_id": qid, "content": "not helpful"}, T0 + 1000)
    aid = sim.reply(created)["data"]["answer"]["answer_id"]
    assert engine.questions[qid].status == QuestionStatus.ANSWERED
    sim.call(3, "delete_answer", {"answer_id": aid}, T0 + 2000)

    assert (engine.questions[qid].status, engine.questions[qid].answer_count) == (QuestionStatus.OPEN, 0)
    raised = [w for w in tick(engine, T0 + 600_000).writes if isinstance(w, AppendEvent)]
    assert [w.type for w in raised] == ["slow_response_alert"]


def test_live_deadlines_and_writes_due_together_go_in_separate_ticks() -> None:
    """A hello deadline and an expiry due at the same moment: the close goes in a tick without writes (an
    outcome whose commit fails is dropped whole, and the close with it), the expiry in the next one."""
    from dongne.core.settings import QuestionSettings

    settings = CoreSettings(hello_timeout_s=60.0, questions=QuestionSettings(ttl_s=60.0))
    engine = Engine(settings, claims_for)
    sim = Sim(engine)
    sim.connect(1, "asker")
    qid = ask(sim)
    engine.handle(Connected(9), T0)  # never says hello

    first = tick(engine, T0 + 60_000)
    second = tick(engine, T0 + 60_000)
    assert engine.next_deadline() != T0 + 60_000  # nothing left due

    assert [a for a in first.actions if isinstance(a, Close)] == [Close(9, 4001, "no hello within the time limit")]
    assert first.writes == ()
    assert [(w.question_id, w.status) for w in second.writes if isinstance(w, CloseOnce)] == [
        (qid, QuestionStatus.EXPIRED)
    ]
    assert not [a for a in second.actions if isinstance(a, Close)]


def _three_locals_and_a_question(
    stage: StagePlan, engine: Engine | None = None, sim: Sim | None = None, locals_: tuple[int, ...] = (3, 4, 5)
) -> tuple[Engine, Sim, Outcome, str]:
    """One stage in batches of one; three online locals east of the question (local3 nearest) and an asker
    (``engine`` and ``sim``: in one already set up; ``locals_``: their numbers, also their connections)."""
    if engine is None or sim is None:
        engine = Engine(CoreSettings(stages=(stage,), alerts_per_batch=1), claims_for)
        sim = Sim(engine)
    for conn_id, lng in zip(locals_, (126.5320, 126.5420, 126.5740, 126.5750), strict=False):
        sim.connect(conn_id, f"local{conn_id}")
        engine.users[f"local{conn_id}"].local = True
        engine.where.refresh_local(engine.users[f"local{conn_id}"], T0)
        sim.call(conn_id, "update_location", {"location": {"lat": 33.4996, "lng": lng}})
    sim.connect(2, "asker")
    created = sim.call(2, "create_question", {"title": "t", "location": {"lat": 33.4996, "lng": 126.5312}})
    return engine, sim, created, sim.reply(created)["data"]["question"]["question_id"]


def test_a_stage_only_for_unanswered_questions_stops_between_batches_once_answered() -> None:
    """FINAL goes only to questions still without an answer: one answered while FINAL is delivered in
    batches gets none of the batches after the answer."""
    final = StagePlan("FINAL", 0.0, None, None, "everyone", only_if_unanswered=True)
    engine, sim, created, qid = _three_locals_and_a_question(final)
    first = [w.user_id for w in created.writes if isinstance(w, AppendEvent)]
    sim.call(3, "join_question", {"question_id": qid}, T0 + 10)
    sim.call(3, "create_answer", {"question_id": qid, "content": "by the port"}, T0 + 20)
    later = fire(engine, qid, T0 + 30)

    assert first == ["local3"]  # one batch of one
    assert [w for w in later.writes if isinstance(w, AppendEvent) and w.type == "new_question_notification"] == []
    assert engine.escalation_due(qid) is None
    # Only the one alerted counts against their cap: the others were planned, never sent.
    counts = {u: engine.where.ledger.count_last_hour(u, T0 + 30) for u in ("local3", "local4", "local5")}
    assert counts == {"local3": 1, "local4": 0, "local5": 0}


def test_a_question_closed_in_the_middle_of_a_stage_takes_back_the_alerts_it_did_not_send() -> None:
    """A stage is planned at once and sent in batches: when the question ends in between, its locals not alerted
    yet are not counted against their caps (a restart, reading what was sent, would not count them either)."""
    everyone = StagePlan("ALL", 0.0, None, None, "everyone")
    engine, sim, created, qid = _three_locals_and_a_question(everyone)
    assert [w.user_id for w in created.writes if isinstance(w, AppendEvent)] == ["local3"]
    sim.call(2, "close_question", {"question_id": qid}, T0 + 10)

    assert engine.escalation_due(qid) is None
    counts = {u: engine.where.ledger.count_last_hour(u, T0 + 10) for u in ("local3", "local4", "local5")}
    assert counts == {"local3": 1, "local4": 0, "local5": 0}


def test_a_local_banned_in_the_middle_of_a_stage_gets_none_of_its_batches_left() -> None:
    """A banned local is alerted for nothing, the stage being sent in batches included: the ban (here, or on
    another node: its profile) takes them out of what is left, and their planned alert off their cap."""
    everyone = StagePlan("ALL", 0.0, None, None, "everyone")
    engine, sim, created, qid = _three_locals_and_a_question(everyone)
    assert [w.user_id for w in created.writes if isinstance(w, AppendEvent)] == ["local3"]
    connect_admin(sim, 9)
    assert sim.reply(sim.call(9, "ban_user", {"user_id": "local4", "reason": "abusive"}, T0 + 10))["ok"]
    banned_elsewhere = attrs_copy(engine.users["local5"])
    assert isinstance(banned_elsewhere, User)
    banned_elsewhere.banned_until, banned_elsewhere.ban_reason = T0 + 3_600_000, "spam"
    engine.handle(UsersChanged((banned_elsewhere,)), T0 + 11)
    later = [fire(engine, qid, T0 + 20), fire(engine, qid, T0 + 30)]

    alerted = [w.user_id for o in later for w in o.writes if isinstance(w, AppendEvent)]
    assert alerted == [] and not any(isinstance(w, EnqueuePush) for o in later for w in o.writes)
    assert engine.escalation_due(qid) is None
    counts = {u: engine.where.ledger.count_last_hour(u, T0 + 30) for u in ("local3", "local4", "local5")}
    assert counts == {"local3": 1, "local4": 0, "local5": 0}


def test_online_or_not_is_asked_as_each_batch_leaves_not_when_the_stage_was_planned() -> None:
    """PROTOCOL: an offline local also gets a push. The stage is planned with local4 online and local6 offline
    (found at home): local4 left before their batch, and got no push; local6 came back, and got both a live
    event and a push."""
    everyone = StagePlan("ALL", 0.0, None, None, "everyone")
    engine = Engine(CoreSettings(stages=(everyone,), alerts_per_batch=1), _crowd_claims)  # local* are locals
    sim = Sim(engine)
    sim.connect(6, "local6")
    sim.call(6, "update_settings", {"home": {"lat": 33.4996, "lng": 126.5900}})  # farthest east
    engine.handle(Disconnected(6), T0)
    engine, sim, created, qid = _three_locals_and_a_question(everyone, engine, sim)
    assert [w.user_id for w in created.writes if isinstance(w, AppendEvent)] == ["local3"]
    engine.handle(Disconnected(4), T0 + 10)
    sim.connect(7, "local6", T0 + 10)
    later = [fire(engine, qid, T0 + at) for at in (20, 30, 40)]

    alerted = [w.user_id for o in later for w in o.writes if isinstance(w, AppendEvent)]
    pushed = [w.job.user_id for o in later for w in o.writes if isinstance(w, EnqueuePush)]
    notified = [row for o in later for w in o.writes if isinstance(w, SaveNotified) for row in w.targets]
    assert alerted == ["local4", "local5", "local6"]
    assert pushed == ["local4"]
    assert [(user_id, online) for user_id, _, _, online in notified] == [
        ("local4", False),
        ("local5", True),
        ("local6", True),
    ]
    sim.deliver(later[2])
    assert [f["data"]["question_id"] for f in sim.take(7) if f["type"] == "new_question_notification"] == [qid]


def test_a_local_whose_new_settings_refuse_the_stage_gets_none_of_its_batches_left() -> None:
    """Settings changed between the stage's planning and their batch: muted (cap 0), in quiet hours begun
    (17:00 in Korea at T0), immediate alerts off for a stage that needs them; they were alerted all the same.
    Their planned alert is taken off their cap, as for a ban."""
    hour = ((T0 + 540 * 60_000) // 3_600_000) % 24
    immediate = StagePlan("NOW", 0.0, None, None, "everyone", requires_immediate_alerts=True)
    engine, sim, created, qid = _three_locals_and_a_question(immediate, locals_=(3, 4, 5, 8))
    assert [w.user_id for w in created.writes if isinstance(w, AppendEvent)] == ["local3"]
    sim.call(4, "update_settings", {"max_alerts_per_hour": 0}, T0 + 10)
    sim.call(5, "update_settings", {"quiet_hours": [hour, (hour + 1) % 24]}, T0 + 10)
    sim.call(8, "update_settings", {"immediate_alerts": False}, T0 + 10)
    later = [fire(engine, qid, T0 + at) for at in (20, 30, 40)]

    assert [w.user_id for o in later for w in o.writes if isinstance(w, AppendEvent)] == []
    assert engine.escalation_due(qid) is None
    counts = {u: engine.where.ledger.count_last_hour(u, T0 + 40) for u in ("local3", "local4", "local5", "local8")}
    assert counts == {"local3": 1, "local4": 0, "local5": 0, "local8": 0}


def test_a_local_who_raises_their_cap_or_lowers_it_with_room_keeps_their_alert() -> None:
    """Only what the change refuses is dropped: a cap raised, or lowered with room left under it, keeps it."""
    everyone = StagePlan("ALL", 0.0, None, None, "everyone")
    engine, sim, _, qid = _three_locals_and_a_question(everyone)
    sim.call(4, "update_settings", {"max_alerts_per_hour": 2}, T0 + 10)
    sim.call(5, "update_settings", {"max_alerts_per_hour": 30}, T0 + 10)
    later = [fire(engine, qid, T0 + at) for at in (20, 30)]

    assert [w.user_id for o in later for w in o.writes if isinstance(w, AppendEvent)] == ["local4", "local5"]


def test_a_connection_without_hello_is_closed_at_its_deadline_exactly() -> None:
    engine = Engine(CoreSettings(hello_timeout_s=10.0), claims_for)
    engine.handle(Connected(1), T0)
    engine.handle(Connected(2), T0)
    send(engine, 2, "hello", {"token": "ok:mina"})

    assert engine.next_deadline() == T0 + 10_000
    assert tick(engine, T0 + 9999) == Outcome()
    assert tick(engine, T0 + 10_000).actions == (Close(1, 4001, "no hello within the time limit"),)
    assert engine.user_of(2) == "mina"  # the one that said hello stays


def test_hello_timeouts_that_no_longer_apply_are_not_deadlines() -> None:
    engine = Engine(CoreSettings(hello_timeout_s=10.0), claims_for)
    engine.handle(Connected(1), T0)
    engine.handle(Connected(2), T0 + 1000)
    engine.handle(Connected(3), T0 + 2000)
    engine.handle(Connected(4), T0 + 3000)
    send(engine, 1, "hello", {"token": "ok:mina"}, T0 + 500)
    engine.handle(Disconnected(2), T0 + 1500)
    send(engine, 4, "hello", {"token": "ok:jun"}, T0 + 3500)

    # 1 said hello and 2 closed: the first deadline left is 3's; 4's hello is not one either.
    assert engine.next_deadline() == T0 + 12_000
    assert tick(engine, T0 + 12_000).actions == (Close(3, 4001, "no hello within the time limit"),)
    assert engine.next_deadline() is None
    assert engine.user_of(1) == "mina" and engine.user_of(4) == "jun"


def test_a_question_not_in_memory_is_asked_for_after_the_rate_limit() -> None:
    from dongne.core import Question

    engine = Engine(CoreSettings(limits=LimitSettings(conn_per_s=1.0, conn_burst=2.0)), claims_for)
    engine.handle(Connected(1), T0)
    send(engine, 1, "hello", {"token": "ok:mina"})
    asked = engine.handle(FrameReceived(1, frame("join_question", 2, {"question_id": "q-old"})), T0)
    assert asked.load_question == "q-old" and asked.actions == ()
    old = Question("q-old", "jun", "Jun", "old", "", 33.5, 126.5, None, (), "normal", T0 - 10**9)
    joined = engine.handle(QuestionLoaded(1, old, ()), T0)
    reply = joined.actions[0]
    assert isinstance(reply, Send) and reply.frame["ok"] and reply.frame["data"]["question"]["question_id"] == "q-old"
    # Over the connection's rate, a request is refused before anything is read for it.
    limited = engine.handle(FrameReceived(1, frame("join_question", 3, {"question_id": "q-other"})), T0)
    assert limited.load_question is None and limited.error == "rate_limited"


def test_a_request_refused_for_its_fields_gives_its_operations_token_back() -> None:
    """Five titles too long do not use up the burst of five questions; the connection still counts them."""
    sim = Sim(Engine(CoreSettings(limits=LimitSettings(conn_per_s=1.0, conn_burst=20.0)), claims_for))
    sim.connect(1, "asker")
    sim.connect(2, "local")
    where = {"lat": 33.5, "lng": 126.5}
    refused = [
        sim.call(1, "create_question", {"title": "x" * 201, "location": where}).error,
        sim.call(1, "create_question", {"title": "t", "body": "x" * 1001, "location": where}).error,
        sim.call(1, "create_question", {"title": "t", "location": {"lat": 91, "lng": 0}}).error,
        sim.call(1, "create_question", {"title": "t", "location": where, "hashtags": ["?"]}).error,
        sim.call(1, "create_question", {"title": "t", "location": where, "urgency": "now"}).error,
    ]
    assert refused == ["too_long", "too_long", "invalid_location", "invalid_field", "invalid_field"]
    asked = [sim.call(1, "create_question", {"title": f"q{i}", "location": where}).error for i in range(6)]
    assert asked == [None] * 5 + ["rate_limited"]  # the burst of five is whole, and still a limit
    later = T0 + 180_000  # a question's token back after 3 minutes (20 an hour)
    qid = ask(sim, 1, later)
    for _ in range(10):
        assert sim.call(2, "create_answer", {"question_id": qid, "content": ""}, later).error == "invalid_field"
    assert sim.call(2, "create_answer", {"question_id": qid, "content": "hi"}, later).error is None
    # Refused for what the state says, a request counts: ten answers to one's own question use the burst.
    mine = [sim.call(1, "create_answer", {"question_id": qid, "content": "me"}, later).error for _ in range(11)]
    assert mine == ["forbidden"] * 10 + ["rate_limited"]
    # The connection's own bucket counts every frame: after its hello, 19 bad answers empty it.
    sim.connect(3, "other", later)
    bad = [sim.call(3, "create_answer", {"question_id": qid, "content": ""}, later).error for _ in range(20)]
    assert bad == ["invalid_field"] * 19 + ["rate_limited"]


def test_a_request_refused_as_unavailable_gives_its_operations_token_back() -> None:
    """Retried through an outage, a user's questions use up none of their burst of five: refused by the engine
    while writes fail, or decided and then refused by the driver (its commit failed: ``not_applied``)."""
    from dongne.core import WritesFailing, WritesWork

    sim = Sim(Engine(CoreSettings(limits=LimitSettings(conn_per_s=1.0, conn_burst=50.0)), claims_for))
    sim.connect(1, "asker")
    where = {"lat": 33.5, "lng": 126.5}
    decided = [sim.call(1, "create_question", {"title": f"lost {i}", "location": where}) for i in range(5)]
    assert [outcome.error for outcome in decided] == [None] * 5
    for outcome in decided:  # their commit failed: the driver answered each unavailable
        assert outcome.request is not None
        sim.engine.not_applied(outcome.request[0], outcome.op)
    sim.engine.handle(WritesFailing("database or disk is full"), T0)
    retried = [sim.call(1, "create_question", {"title": "again", "location": where}).error for _ in range(6)]
    assert retried == ["unavailable"] * 6
    sim.engine.handle(WritesWork(), T0 + 1000)
    asked = [sim.call(1, "create_question", {"title": f"q{i}", "location": where}, T0 + 1000).error for i in range(6)]
    assert asked == [None] * 5 + ["rate_limited"]  # the burst whole, and still a limit


def test_while_writes_fail_writing_operations_are_refused_before_anything_changes() -> None:
    from dongne.core import WritesFailing, WritesWork

    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    sim.take(1)
    sim.engine.handle(WritesFailing("database or disk is full"), T0)
    refused = sim.call(2, "create_answer", {"question_id": qid, "content": "hi"})
    assert refused.writes == ()
    assert refused.error == "unavailable"
    assert sim.reply(refused)["error"]["retry_after_ms"] == 1000
    assert sim.engine.questions[qid].answer_count == 0 and sim.take(1) == []
    # Reads and live operations go on.
    assert sim.reply(sim.call(2, "join_question", {"question_id": qid}))["ok"]
    assert sim.reply(sim.call(2, "typing_start", {"question_id": qid}))["ok"]
    # A profile that would have to be stored cannot say hello; a known one can, without writing receipts.
    sim.engine.handle(Connected(3), T0)
    assert sim.call(3, "hello", {"token": "ok:newcomer"}).actions[0] == Close(
        3, 1013, "the server cannot store your profile now; reconnect later"
    )
    known = sim.connect(4, "asker")
    assert known.writes == () and sim.reply(known)["ok"]
    sim.engine.handle(WritesWork(), T0 + 5000)
    assert sim.call(2, "create_answer", {"question_id": qid, "content": "hi"}, T0 + 5000).writes != ()


def test_stages_and_alerts_due_while_writes_fail_run_late_not_never() -> None:
    from dongne.core import AlertSettings, StagePlan, WritesFailing, WritesWork

    stages = (StagePlan("EVERYONE", 60.0, None, None, "everyone"),)
    engine = Engine(CoreSettings(stages=stages, alerts=AlertSettings(slow_response_s=30.0)), claims_for)
    sim = Sim(engine)
    connect_admin(sim, 1)
    sim.connect(2, "asker")
    qid = ask(sim, 2)
    failing = engine.handle(WritesFailing("disk I/O error"), T0 + 1000)
    alerts = [a.frame for a in failing.actions if isinstance(a, Send)]
    assert [(f["type"], f["data"]["state"]) for f in alerts] == [("storage_alert", "failing")]
    assert tick(engine, T0 + 30_000).writes == ()  # the alert is held
    assert fire(engine, qid, T0 + 60_000) == Outcome()  # so is the stage
    assert engine.escalation_due(qid) == T0 + 60_000
    assert engine.next_deadline() == T0 + 31_000  # the held alert is due again a second later
    recovered = engine.handle(WritesWork(), T0 + 90_000)
    from dongne.core import StartEscalation

    assert StartEscalation(qid, T0 + 60_000) in recovered.actions
    late = tick(engine, T0 + 90_000)
    assert [w.type for w in late.writes if isinstance(w, AppendEvent)] == ["slow_response_alert"]
    assert fire(engine, qid, T0 + 90_000).writes != ()
    assert engine.escalation_due(qid) is None


def test_writes_taken_on_trial_that_fail_again_are_the_same_outage() -> None:
    """The probe's one row fitted, a real commit did not: no second ``failing``, and ``recovered`` only once
    the driver confirms it."""
    from dongne.core import WritesFailing, WritesWork

    engine = Engine(CoreSettings(), claims_for)
    sim = Sim(engine)
    connect_admin(sim, 1)

    def alerts(outcome: Outcome) -> list[str]:
        return [a.frame["data"]["state"] for a in outcome.actions if isinstance(a, Send)]

    seen = [alerts(engine.handle(WritesFailing("database or disk is full"), T0))]
    seen.append(alerts(engine.handle(WritesWork(confirmed=False), T0 + 1000)))  # the probe committed
    assert engine.writable
    seen.append(alerts(engine.handle(WritesFailing("database or disk is full"), T0 + 1100)))
    assert not engine.writable
    seen.append(alerts(engine.handle(WritesWork(confirmed=False), T0 + 3000)))
    seen.append(alerts(engine.handle(WritesWork(), T0 + 9000)))  # really back
    seen.append(alerts(engine.handle(WritesFailing("disk I/O error"), T0 + 20_000)))  # a new outage

    assert seen == [["failing"], [], [], [], ["recovered"], ["failing"]]


def test_a_reload_keeps_live_state_and_forgets_what_was_never_committed() -> None:
    from dongne.core import LoadedState, Reloaded, WritesFailing

    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "local")
    kept = ask(sim)
    stored_users = [attrs_copy(sim.engine.users[u]) for u in ("asker", "local")]
    stored_question = attrs_copy(sim.engine.questions[kept])
    sim.connect(3, "newcomer")  # this hello's SaveUser is in the commit that fails
    lost = ask(sim, 1)  # and so is this question
    sim.call(2, "join_question", {"question_id": lost})
    sim.engine.handle(WritesFailing("database or disk is full"), T0)
    reloaded = sim.engine.handle(Reloaded(LoadedState(stored_users, [stored_question], [])), T0)

    assert Close(3, 1013, "the server lost your profile to a storage failure; reconnect") in reloaded.actions
    assert set(sim.engine.questions) == {kept}
    assert lost not in sim.engine.presence.rooms and kept in sim.engine.presence.rooms
    assert sim.engine.user_of(2) == "local"  # connections stay
    assert sim.reply(sim.call(2, "join_question", {"question_id": kept}))["ok"]


def attrs_copy(record: object) -> object:
    import attrs

    return attrs.evolve(record)  # type: ignore[misc]


def test_a_read_the_store_cannot_answer_fails_the_request_not_the_connection() -> None:
    from dongne.core import ReadFailed
    from dongne.core.reads import QuestionsOfAsker

    sim = Sim(make_engine())
    sim.connect(1, "asker")
    asked = sim.engine.handle(FrameReceived(1, frame("my_questions", 7, {"limit": 5})), T0)
    assert asked.read == QuestionsOfAsker("asker", None, False, None, 5) and asked.actions == ()
    failed = sim.engine.handle(ReadFailed(1), T0)
    reply = sim.reply(failed)
    assert (reply["id"], reply["error"]["code"]) == (7, "internal")
    assert sim.reply(sim.call(1, "get_profile", {}))["ok"]


def test_a_write_whose_question_was_being_read_when_writes_failed_is_refused() -> None:
    from dongne.core import Question, WritesFailing

    sim = Sim(make_engine())
    sim.connect(1, "local")
    asked = sim.engine.handle(
        FrameReceived(1, frame("create_answer", 5, {"question_id": "q-old", "content": "hi"})), T0
    )
    assert asked.load_question == "q-old"
    sim.engine.handle(WritesFailing("disk full"), T0)  # while the store was being read
    old = Question("q-old", "jun", "Jun", "old", "", 33.5, 126.5, None, (), "normal", T0 - 10**6)
    answered = sim.engine.handle(QuestionLoaded(1, old, ()), T0)
    assert answered.writes == () and answered.error == "unavailable"
    assert old.answer_count == 0


def test_a_bug_in_a_read_reply_answers_internal() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    asked = sim.engine.handle(FrameReceived(1, frame("my_questions", 9, {})), T0)
    assert asked.read is not None
    broken = sim.engine.handle(ReadDone(1, [("not", "a", "row")]), T0)
    reply = sim.reply(broken)
    assert (reply["id"], reply["error"]["code"]) == (9, "internal")


def _old_answered_question() -> tuple[Question, Answer]:
    """A closed question no longer in memory, as the store holds it, and its one answer (by ``jun``)."""
    question = Question("q-old", "asker", "Asker", "old", "", 33.5, 126.5, None, (), "normal", T0 - 10**9)
    question.status, question.answer_count, question.closed_at = QuestionStatus.CLOSED, 1, T0 - 10**8
    return question, Answer("a-old", "q-old", "jun", "Jun", "visit my shop", T0 - 10**9 + 1)


def _read_back(sim: Sim, conn_id: int, question: Question, answer: Answer, now: int = T0) -> Outcome:
    """The store's answer to a ``ModerationItem`` read: fresh copies, as each read makes its own."""
    outcome = sim.engine.handle(ReadDone(conn_id, (attrs_copy(question), [attrs_copy(answer)])), now)
    sim.deliver(outcome)
    return outcome


def _asks(sim: Sim, conn_id: int, op: str, data: dict, rid: int) -> Outcome:  # type: ignore[type-arg]
    outcome = sim.engine.handle(FrameReceived(conn_id, frame(op, rid, data)), T0)
    assert outcome.read == ModerationItem("answer", "a-old") and outcome.actions == ()  # out of memory: read
    return outcome


def test_a_moderation_request_that_fails_after_its_read_leaves_nothing_for_the_next() -> None:
    """Two admins resolve a report of an old answer at once: the one that loses gets not_found, and its read
    goes with it (the next operation on the answer reads the store again rather than trusting that copy)."""
    sim = Sim(make_engine())
    sim.connect(1, "r1")
    connect_admin(sim, 8, "ops")
    connect_admin(sim, 9, "ops2")
    question, answer = _old_answered_question()
    _asks(sim, 1, "report_content", {"answer_id": "a-old", "reason": "spam"}, 10)
    report_id = sim.reply(_read_back(sim, 1, question, answer))["data"]["report_id"]

    _asks(sim, 8, "resolve_report", {"report_id": report_id, "action": "dismiss"}, 11)
    _asks(sim, 9, "resolve_report", {"report_id": report_id, "action": "dismiss"}, 12)
    assert sim.reply(_read_back(sim, 8, question, answer))["data"]["resolved"] == 1
    lost = sim.reply(_read_back(sim, 9, question, answer))

    assert lost["error"]["code"] == "not_found"
    _asks(sim, 9, "hide_answer", {"id": "a-old", "reason": "spam after all"}, 13)


def _hidden_by_the_first(question: Question, answer: Answer) -> tuple[Question, Answer]:
    """The rows as the first hide's commit left them (``CountAnswer`` counts in SQL)."""
    gone = attrs_copy(answer)
    assert isinstance(gone, Answer)
    gone.hidden, gone.deleted_at = True, T0
    shown = attrs_copy(question)
    assert isinstance(shown, Question)
    shown.answer_count = 0
    return shown, gone


def test_two_hides_of_one_old_answer_at_once_take_it_down_once_and_two_unhides_show_it_once() -> None:
    """Both admins read it shown; the second to run again reads it anew (the driver reads after the commits
    queued before: the first hide's) and changes nothing: one count, one notice, one audit entry."""
    sim = Sim(make_engine())
    sim.connect(3, "jun")
    sim.take(3)
    connect_admin(sim, 8, "ops")
    connect_admin(sim, 9, "ops2")
    question, answer = _old_answered_question()
    _asks(sim, 8, "hide_answer", {"id": "a-old", "reason": "spam 1"}, 10)
    _asks(sim, 9, "hide_answer", {"id": "a-old", "reason": "spam 2"}, 11)
    first = _read_back(sim, 8, question, answer)
    assert sim.reply(first)["data"]["changed"] is True
    assert CountAnswer("q-old", -1, answer_id="a-old") in first.writes
    again = _read_back(sim, 9, question, answer)  # read before the first hide
    assert again.read == ModerationItem("answer", "a-old") and again.actions == () and again.writes == ()
    question, answer = _hidden_by_the_first(question, answer)
    second = _read_back(sim, 9, question, answer)

    assert sim.reply(second)["data"] == {"id": "a-old", "hidden": True, "changed": False}
    assert second.writes == ()
    assert [e["type"] for e in sim.take(3)] == ["content_hidden"]

    _asks(sim, 8, "unhide_answer", {"id": "a-old"}, 12)
    _asks(sim, 9, "unhide_answer", {"id": "a-old"}, 13)
    shown = _read_back(sim, 8, question, answer)
    assert sim.reply(shown)["data"]["changed"] is True and CountAnswer("q-old", 1, answer_id="a-old") in shown.writes
    assert _read_back(sim, 9, question, answer).read == ModerationItem("answer", "a-old")
    assert sim.reply(_read_back(sim, 9, *_old_answered_question()))["data"]["changed"] is False


def test_two_reports_crossing_the_threshold_at_once_hide_an_old_answer_once() -> None:
    from dongne.core.settings import ModerationSettings

    sim = Sim(Engine(CoreSettings(moderation=ModerationSettings(auto_hide_reports=2)), claims_for))
    for conn_id, user in ((1, "r1"), (2, "r2"), (3, "r3")):
        sim.connect(conn_id, user)
    question, answer = _old_answered_question()
    _asks(sim, 1, "report_content", {"answer_id": "a-old", "reason": "spam"}, 10)
    assert sim.reply(_read_back(sim, 1, question, answer))["ok"]
    _asks(sim, 2, "report_content", {"answer_id": "a-old", "reason": "spam"}, 11)
    _asks(sim, 3, "report_content", {"answer_id": "a-old", "reason": "spam"}, 12)
    hid = _read_back(sim, 2, question, answer)
    assert sim.reply(hid)["ok"] and CountAnswer("q-old", -1, answer_id="a-old") in hid.writes
    assert _read_back(sim, 3, question, answer).read == ModerationItem("answer", "a-old")
    late = sim.reply(_read_back(sim, 3, *_hidden_by_the_first(question, answer)))

    assert late["error"]["code"] == "not_found"  # hidden: no longer there to report


def test_a_question_read_before_a_hide_of_it_is_read_again_not_adopted() -> None:
    """A join reads an old question from the store; an admin hides an answer of it meanwhile (in the store
    only: it is not in memory). The join's copy predates the hide: adopted, it would serve the answer to
    everyone and be written back by the next receipt. It is read again; the second copy is adopted."""
    sim = Sim(make_engine())
    sim.connect(1, "viewer")
    connect_admin(sim, 8, "ops")
    question, answer = _old_answered_question()
    joining = sim.engine.handle(FrameReceived(1, frame("join_question", 5, {"question_id": "q-old"})), T0)
    assert joining.load_question == "q-old"
    _asks(sim, 8, "hide_answer", {"id": "a-old", "reason": "spam"}, 10)
    assert sim.reply(_read_back(sim, 8, question, answer))["data"]["changed"] is True

    stale = sim.engine.handle(QuestionLoaded(1, attrs_copy(question), (attrs_copy(answer),)), T0)
    assert stale.load_question == "q-old" and stale.actions == () and stale.writes == ()
    assert "q-old" not in sim.engine.questions
    question, answer = _hidden_by_the_first(question, answer)
    joined = sim.engine.handle(QuestionLoaded(1, attrs_copy(question), ()), T0)  # the store leaves hidden out
    sim.deliver(joined)
    reply = sim.reply(joined)
    assert reply["ok"] and reply["data"]["answers"] == [] and reply["data"]["question"]["answer_count"] == 0


def test_an_old_question_read_before_a_receipt_written_for_it_is_read_again() -> None:
    """The asker comes back: an answer to an expired question, still ``sent`` in the store, is marked
    ``delivered`` there only. A copy of the question read before that would bring it back as ``sent``
    (a second receipt for its author); it is read again."""
    sim = Sim(make_engine())
    question, answer = _old_answered_question()
    sim.engine.inbox.track_stored("asker", "q-old", "a-old", "jun")
    sim.connect(1, "viewer")
    joining = sim.engine.handle(FrameReceived(1, frame("join_question", 5, {"question_id": "q-old"})), T0)
    assert joining.load_question == "q-old"
    sim.connect(2, "asker")  # delivered, in the store only

    stale = sim.engine.handle(QuestionLoaded(1, attrs_copy(question), (attrs_copy(answer),)), T0)
    assert stale.load_question == "q-old"
    answer.state, answer.delivered_at = ReceiptState.DELIVERED, T0
    joined = sim.engine.handle(QuestionLoaded(1, attrs_copy(question), (attrs_copy(answer),)), T0)
    assert sim.reply(joined)["data"]["answers"][0]["state"] == "delivered"


def test_an_answers_delete_read_before_a_hide_of_its_question_is_read_again() -> None:
    """delete_answer reads an old answer's question (AnswerHome); an admin hides the question meanwhile. The
    delete's copy predates the hide: adopted, the hidden question would be served from memory. It is read again."""
    sim = Sim(make_engine())
    sim.connect(3, "jun")
    sim.connect(1, "viewer")
    connect_admin(sim, 8, "ops")
    question, answer = _old_answered_question()
    deleting = sim.engine.handle(FrameReceived(3, frame("delete_answer", 50, {"answer_id": "a-old"})), T0)
    assert deleting.read == AnswerHome("a-old")
    assert sim.engine.handle(FrameReceived(8, frame("hide_question", 51, {"id": "q-old", "reason": "spam"})), T0).read
    sim.deliver(sim.engine.handle(ReadDone(8, (attrs_copy(question), [attrs_copy(answer)])), T0))

    again = sim.engine.handle(ReadDone(3, (attrs_copy(question), [attrs_copy(answer)])), T0)
    assert again.read == AnswerHome("a-old") and again.writes == () and "q-old" not in sim.engine.questions
    gone = sim.engine.handle(ReadDone(3, None), T0)  # the store leaves a hidden question's answers out
    assert sim.reply(gone)["error"]["code"] == "not_found"
    assert sim.engine.handle(FrameReceived(1, frame("get_question", 52, {"question_id": "q-old"})), T0).read


def test_a_hide_read_before_the_authors_delete_through_memory_takes_nothing_down_again() -> None:
    """hide_answer reads an old answer; its author's delete_answer brings the question into memory and deletes
    the answer there. The hide's copy, from before, is read again: the answer is not counted down twice."""
    sim = Sim(make_engine())
    sim.connect(3, "jun")
    connect_admin(sim, 8, "ops")
    question, answer = _old_answered_question()
    assert sim.engine.handle(FrameReceived(8, frame("hide_answer", 51, {"id": "a-old", "reason": "spam"})), T0).read
    stale = (attrs_copy(question), [attrs_copy(answer)])  # what the hide's read returned
    assert sim.engine.handle(FrameReceived(3, frame("delete_answer", 50, {"answer_id": "a-old"})), T0).read
    deleted = sim.engine.handle(ReadDone(3, (attrs_copy(question), [attrs_copy(answer)])), T0)
    sim.deliver(deleted)
    assert CountAnswer("q-old", -1, answer_id="a-old") in deleted.writes

    again = sim.engine.handle(ReadDone(8, stale), T0)
    assert again.read == ModerationItem("answer", "a-old") and again.writes == ()
