"""The engine's side of several nodes (store/CLUSTER.md), without I/O and with explicit ``now``: the guarded
question writes it emits, and the copies of questions it replaces when the store says another node changed them."""

from __future__ import annotations

import itertools

import attrs

from dongne.core import (
    AcceptOnce,
    CancelEscalation,
    CloseOnce,
    Connected,
    CoreSettings,
    CountAnswer,
    Engine,
    EscalationDue,
    EscalationProgress,
    IfOpen,
    InboxPruned,
    Outcome,
    QuestionChanged,
    RelayRoom,
    RemoteAlerts,
    RemoteMembers,
    RoomNews,
    RoomRelayed,
    SaveQuestion,
    StagePlan,
    StageRefused,
    StartEscalation,
    User,
    UserLoaded,
    UsersChanged,
)
from dongne.core.effects import AppendEvent, Close, DeliverAnswer, DropPushes
from dongne.core.events import Disconnected, Tick
from dongne.core.lifecycle import QuestionStatus
from dongne.core.records import Answer, Question
from dongne.core.settings import QuestionSettings

from .test_engine import T0, Sim, ask, claims_for, make_engine, send


def raced(outcome: object) -> list[object]:
    writes = getattr(outcome, "writes", ())
    return [w for w in writes if isinstance(w, (SaveQuestion, CountAnswer, AcceptOnce, CloseOnce))]


def test_answering_accepting_and_closing_emit_guarded_writes_not_the_whole_question() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    answered = sim.call(2, "create_answer", {"question_id": qid, "content": "by the port"}, T0 + 5)
    answer_id = sim.reply(answered)["data"]["answer"]["answer_id"]
    accepted = sim.call(1, "accept_answer", {"question_id": qid, "answer_id": answer_id}, T0 + 9)
    qid2 = ask(sim, now=T0 + 10)
    closed = sim.call(1, "close_question", {"question_id": qid2}, T0 + 11)

    assert raced(answered) == [CountAnswer(qid, 1, answered_at=T0 + 5)]
    assert raced(accepted) == [AcceptOnce(qid, answer_id, T0 + 9)]
    assert raced(closed) == [CloseOnce(qid2, "closed", T0 + 11)]


def test_a_new_accepted_or_deleted_answer_is_news_for_the_rooms_members_on_other_nodes() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    kept, gone = (
        sim.reply(sim.call(2, "create_answer", {"question_id": qid, "content": text}, T0 + 5))["data"]["answer"]
        for text in ("by the port", "no idea")
    )
    deleted = sim.call(2, "delete_answer", {"answer_id": gone["answer_id"]}, T0 + 7)
    accepted = sim.call(1, "accept_answer", {"question_id": qid, "answer_id": kept["answer_id"]}, T0 + 9)

    def news(outcome: Outcome) -> list[tuple[str, dict[str, object]]]:
        return [(w.kind, w.data) for w in outcome.writes if isinstance(w, RoomNews)]

    assert news(deleted) == [("answer_deleted", {"question_id": qid, "answer_id": gone["answer_id"]})]
    assert news(accepted) == [
        (
            "answer_accepted",
            {"question_id": qid, "answer_id": kept["answer_id"], "author_id": "local", "points": 10},
        )
    ]


def test_an_expiry_is_a_guarded_close() -> None:
    engine = Engine(CoreSettings(questions=QuestionSettings(ttl_s=60.0)), claims_for)
    sim = Sim(engine)
    sim.connect(1, "asker")
    qid = ask(sim)

    expired = engine.handle(Tick(), T0 + 60_000)

    assert raced(expired) == [CloseOnce(qid, "expired", T0 + 60_000, conflict=False)]  # each node expires it


def question_as_stored(sim: Sim, qid: str, **fields: object) -> Question:
    return attrs.evolve(sim.engine.questions[qid], **fields)  # type: ignore[arg-type]


def test_a_question_another_node_resolved_ends_here_and_its_room_hears_it() -> None:
    engine = Engine(CoreSettings(stages=(StagePlan("LATER", 600.0, None, None, "everyone"),)), claims_for)
    sim = Sim(engine)
    sim.connect(1, "asker")
    sim.connect(2, "watcher")
    qid = ask(sim)
    sim.call(2, "join_question", {"question_id": qid})
    sim.take(2)
    assert qid in engine.where.escalations
    answer = Answer("a-elsewhere", qid, "local", "Local", "elsewhere", T0 + 3, "sent", None, None, True)

    stored = question_as_stored(
        sim,
        qid,
        status=QuestionStatus.RESOLVED,
        accepted_answer_id="a-elsewhere",
        answer_count=1,
        first_answer_at=T0 + 3,
        closed_at=T0 + 4,
    )
    out = engine.handle(QuestionChanged(qid, stored, (answer,)), T0 + 5)
    sim.deliver(out)

    held = engine.questions[qid]
    assert (held.status, held.accepted_answer_id, held.answer_count) == (QuestionStatus.RESOLVED, "a-elsewhere", 1)
    assert engine.answers[qid]["a-elsewhere"].accepted
    assert CancelEscalation(qid) in out.actions and qid not in engine.where.escalations
    assert [(f["type"], f["data"]["reason"]) for f in sim.take(2)] == [("question_closed", "accepted")]
    assert out.writes == ()  # the store holds it already
    again = engine.handle(QuestionChanged(qid, attrs.evolve(stored), (answer,)), T0 + 6)
    assert again.actions == ()  # no change: nothing said twice


def test_a_question_another_node_created_is_adopted_and_listed_nearby() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "local")
    created = Question("q-elsewhere", "asker", "Asker", "Open late?", "", 33.5, 126.5, None, (), "normal", T0)
    out = sim.engine.handle(QuestionChanged("q-elsewhere", created), T0 + 1)

    assert out.writes == () and "q-elsewhere" in sim.engine.questions
    nearby = sim.call(1, "nearby_questions", {"location": {"lat": 33.5, "lng": 126.5}, "radius_m": 1000}, T0 + 2)
    assert [q["question_id"] for q in sim.reply(nearby)["data"]["questions"]] == ["q-elsewhere"]


def test_a_question_another_node_asked_is_escalated_from_its_stored_progress() -> None:
    """With the question comes its escalation as stored (IMMEDIATE run there, who was alerted): the engine
    takes it up and starts it (QUICK due next), once; a question it follows already is left alone."""
    sim = Sim(make_engine())
    created = Question("q-elsewhere", "asker", "Asker", "Open late?", "", 33.5, 126.5, None, (), "normal", T0)
    progress = EscalationProgress(1, (("near", T0),))

    out = sim.engine.handle(QuestionChanged("q-elsewhere", created, (), progress), T0 + 1)
    again = sim.engine.handle(QuestionChanged("q-elsewhere", created, (), EscalationProgress(0)), T0 + 2)

    assert [a.question_id for a in out.actions if isinstance(a, StartEscalation)] == ["q-elsewhere"]
    assert sim.engine.follows_escalation("q-elsewhere")
    assert sim.engine.escalation_due("q-elsewhere") == T0 + 3000
    assert sim.engine.where.escalations["q-elsewhere"].notified == {"near"}
    assert [a for a in again.actions if isinstance(a, StartEscalation)] == []
    assert sim.engine.escalation_due("q-elsewhere") == T0 + 3000
    done = attrs.evolve(created, question_id="q-done")
    finished = sim.engine.handle(QuestionChanged("q-done", done, (), EscalationProgress(4, (("near", T0),))), T0 + 3)
    assert [a for a in finished.actions if isinstance(a, StartEscalation)] == []
    assert sim.engine.follows_escalation("q-done")
    assert sim.engine.escalation_due("q-done") is None


def _capped_local(cap: int) -> Sim:
    """An asker (connection 1) and a local 1 km from the question's place (connection 2), at most ``cap``
    alerts an hour, and a question asked on another node whose escalation this node follows (asked at T0,
    its IMMEDIATE run there, alerting nobody)."""
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "near")
    near = sim.engine.users["near"]
    near.local, near.max_alerts_per_hour = True, cap
    sim.engine.where.refresh_local(near, T0)
    sim.call(2, "update_location", {"location": {"lat": 33.4996, "lng": 126.5420}})
    created = Question("q-elsewhere", "other", "Other", "Open late?", "", 33.4996, 126.5312, None, (), "normal", T0)
    sim.engine.handle(QuestionChanged("q-elsewhere", created, (), EscalationProgress(1)), T0 + 1)
    assert sim.engine.follows_escalation("q-elsewhere")
    return sim


def _alerts_for_an_ask_here(sim: Sim, now: int) -> list[str]:
    """The stages of the alerts the local gets when the asker asks a question here at ``now``."""
    sim.call(1, "create_question", {"title": "t", "location": {"lat": 33.4996, "lng": 126.5312}}, now)
    return [f["data"]["stage"] for f in sim.take(2) if f["type"] == "new_question_notification"]


def test_an_alert_the_lease_holder_sent_counts_towards_the_hourly_cap_here() -> None:
    """The holder's QUICK for a question this node follows (its news: ``RemoteAlerts``) fills a cap of 1: the
    IMMEDIATE stage of a question asked here within the hour leaves the local out, and alerts it an hour on."""
    sim = _capped_local(1)

    sim.engine.handle(RemoteAlerts((("q-elsewhere", T0 + 3000, ("near",)),)), T0 + 3010)

    assert sim.engine.where.escalations["q-elsewhere"].notified == {"near"}
    assert _alerts_for_an_ask_here(sim, T0 + 4000) == []
    assert _alerts_for_an_ask_here(sim, T0 + 3000 + 3_600_000) == ["IMMEDIATE"]


def test_an_alert_heard_again_or_read_from_the_store_first_counts_once() -> None:
    """With a cap of 2: an alert taken up with its question's stored progress and then heard in the news
    counts once, and news for a question not followed here is left to its take-up (from the store): one
    IMMEDIATE here still fits, a second does not."""
    sim = _capped_local(2)
    created = Question("q-read", "other", "Other", "Open late?", "", 33.4996, 126.5312, None, (), "normal", T0 + 5)
    sim.engine.handle(QuestionChanged("q-read", created, (), EscalationProgress(1, (("near", T0 + 5),))), T0 + 6)

    sim.engine.handle(RemoteAlerts((("q-read", T0 + 5, ("near",)), ("q-unknown", T0 + 5, ("near",)))), T0 + 7)

    assert not sim.engine.follows_escalation("q-unknown")
    assert _alerts_for_an_ask_here(sim, T0 + 10) == ["IMMEDIATE"]
    assert _alerts_for_an_ask_here(sim, T0 + 20) == []


def test_a_question_another_node_stopped_escalating_is_not_taken_up_whatever_the_plan() -> None:
    """Stored progress is read against this node's plan: two stages here, four run there (a plan shortened
    since) is every stage run, reported as the last of these; one stopped for good there after IMMEDIATE
    (its asker banned, then not any more) is not taken up, however many stages are left here."""
    from dongne.core import CoreSettings, Engine, StagePlan
    from dongne.core.records import stopped_for_good

    two = (StagePlan("IMMEDIATE", 0.0, 2000.0, 10, "online_nearby"), StagePlan("QUICK", 3.0, 5000.0, None, "nearby"))
    engine = Engine(CoreSettings(stages=two), claims_for)
    asked = Question("q-run", "asker", "Asker", "Open late?", "", 33.5, 126.5, None, (), "normal", T0)
    stopped = attrs.evolve(asked, question_id="q-stopped")

    run = engine.handle(QuestionChanged("q-run", asked, (), EscalationProgress(4, (("near", T0),))), T0 + 1)
    halted = engine.handle(QuestionChanged("q-stopped", stopped, (), EscalationProgress(stopped_for_good(1))), T0 + 1)

    assert [a for o in (run, halted) for a in o.actions if isinstance(a, StartEscalation)] == []
    assert engine.escalation_due("q-run") is None and engine.escalation_due("q-stopped") is None
    assert engine.follows_escalation("q-stopped")  # its next news does not read its progress again
    assert {q["question_id"]: q["stage"] for q in engine.overview(T0 + 2)["open"]} == {
        "q-run": "QUICK",
        "q-stopped": "IMMEDIATE",
    }


def test_a_hello_on_a_shared_store_reads_a_user_it_does_not_hold_first() -> None:
    """Another node made the user (points, seqs): the hello waits for the stored row and goes on from it,
    writing nothing over it; a user nobody made is made as on one node; one held is not read."""
    sim = Sim(make_engine())
    sim.engine.shared_store = True
    stored = User("mina", "Mina", points=7, last_seq=4, created_at=T0 - 1000)

    sim.engine.handle(Connected(1), T0)
    waiting = send(sim.engine, 1, "hello", {"token": "ok:mina"}, T0, 1)
    hello = sim.engine.handle(UserLoaded(1, stored), T0 + 1)
    sim.engine.handle(Connected(2), T0)
    fresh = sim.engine.handle(UserLoaded(2, None), T0 + 1)  # nothing asked for it: ignored
    new = send(sim.engine, 2, "hello", {"token": "ok:jun"}, T0, 2)
    made = sim.engine.handle(UserLoaded(2, None), T0 + 1)
    sim.engine.handle(Connected(3), T0)
    again = send(sim.engine, 3, "hello", {"token": "ok:mina"}, T0, 3)

    assert (waiting.load_user, waiting.writes, waiting.actions) == ("mina", (), ())
    assert sim.reply(hello)["data"]["last_seq"] == 4 and hello.writes == ()
    assert sim.engine.users["mina"].points == 7
    assert fresh == Outcome() and new.load_user == "jun"
    assert [type(w).__name__ for w in made.writes] == ["SaveUser"]
    assert again.load_user is None and sim.reply(again)["data"]["last_seq"] == 4


def test_a_resume_on_a_shared_store_learns_where_the_kept_events_start_whoever_pruned_them() -> None:
    """Another node pruned mina's events 1-2: a hello resuming from before her newest reads where hers start
    and says the replay is not whole; one resuming from her newest, or without resume, reads nothing."""
    sim = Sim(make_engine())
    sim.engine.shared_store = True
    sim.engine.handle(UsersChanged((User("mina", "Mina", last_seq=4, created_at=T0 - 1000),)), T0)

    def hello(conn_id: int, data: dict[str, object]) -> Outcome:
        sim.engine.handle(Connected(conn_id), T0)
        return send(sim.engine, conn_id, "hello", {"token": "ok:mina", **data}, T0, conn_id)

    waiting = hello(1, {"resume": {"last_seq": 1}})
    resumed = sim.engine.handle(UserLoaded(1, sim.engine.users["mina"], 3), T0 + 1)
    whole = hello(2, {"resume": {"last_seq": 4}})
    plain = hello(3, {})

    assert waiting.load_user == "mina" and waiting.actions == ()
    assert {k: sim.reply(resumed)["data"][k] for k in ("resumed", "oldest_seq", "last_seq")} == {
        "resumed": False, "oldest_seq": 3, "last_seq": 4
    }  # fmt: skip
    assert whole.load_user is None and sim.reply(whole)["data"]["resumed"] is True
    assert plain.load_user is None and "resumed" not in sim.reply(plain)["data"]


def test_where_a_users_kept_events_start_only_moves_on_whoever_prunes_and_in_whatever_order() -> None:
    """This node pruned mina's events up to 5; another node's news, read before that, says 3 then comes: it
    changes nothing. unread counts the events kept, 6 to 8."""
    sim = Sim(make_engine())
    sim.engine.handle(UsersChanged((User("mina", "Mina", last_seq=8, created_at=T0 - 1000),)), T0)
    sim.engine.handle(InboxPruned({"mina": 6}), T0 + 1)
    sim.engine.handle(InboxPruned({"mina": 3}), T0 + 2)
    hello = sim.connect(1, "mina", T0 + 3)

    assert sim.reply(hello)["data"]["unread"] == 3


def test_a_question_another_node_deleted_leaves_memory_and_its_room() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "watcher")
    qid = ask(sim)
    sim.call(2, "join_question", {"question_id": qid})
    sim.take(2)

    assert sim.engine.handle(QuestionChanged(qid, None), T0 + 1).actions == ()  # no row (yet): nothing known
    deleted = question_as_stored(sim, qid, deleted_at=T0 + 1)
    out = sim.engine.handle(QuestionChanged(qid, deleted), T0 + 2)
    sim.deliver(out)

    assert qid not in sim.engine.questions and qid not in sim.engine.presence.rooms
    assert [f["type"] for f in sim.take(2)] == ["question_deleted"]
    assert DropPushes(qid) in out.actions  # the take-down cancelled its pushes in the outbox, not in the queue here


def test_an_answer_another_node_deleted_has_its_pushes_held_here_dropped() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    answered = sim.call(2, "create_answer", {"question_id": qid, "content": "by the port"}, T0 + 5)
    answer = attrs.evolve(sim.engine.answers[qid][sim.reply(answered)["data"]["answer"]["answer_id"]])

    out = sim.engine.handle(
        QuestionChanged(qid, question_as_stored(sim, qid), (attrs.evolve(answer, deleted_at=T0 + 6),)), T0 + 7
    )
    again = sim.engine.handle(
        QuestionChanged(qid, question_as_stored(sim, qid), (attrs.evolve(answer, deleted_at=T0 + 6),)), T0 + 8
    )

    assert answer.answer_id not in sim.engine.answers[qid]
    assert [a for a in out.actions if isinstance(a, DropPushes)] == [DropPushes(qid, answer.answer_id)]
    assert [a for a in again.actions if isinstance(a, DropPushes)] == []  # once, as it leaves memory


def test_a_merge_never_takes_back_what_this_node_wrote_and_the_store_has_not_yet() -> None:
    """This node's answer and close are still on their way to the store when an older copy arrives."""
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "local")
    qid = ask(sim)
    stored_before = question_as_stored(sim, qid)
    sim.call(2, "create_answer", {"question_id": qid, "content": "by the port"}, T0 + 5)
    sim.call(1, "close_question", {"question_id": qid}, T0 + 6)

    out = sim.engine.handle(QuestionChanged(qid, stored_before, ()), T0 + 7)

    held = sim.engine.questions[qid]
    assert (held.status, held.answer_count, held.first_answer_at) == (QuestionStatus.CLOSED, 1, T0 + 5)
    assert len(sim.engine.answers[qid]) == 1
    assert out.actions == ()


def test_users_another_node_changed_merge_settings_and_bans_but_never_take_back_points_or_seqs() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "mallory")
    sim.connect(2, "bystander")
    held = sim.engine.users["mallory"]
    held.points, held.last_seq = 30, 7
    stored = attrs.evolve(held, points=20, last_seq=5, max_alerts_per_hour=3, banned_until=T0 + 60_000)
    newcomer = User("newcomer", "Newcomer", created_at=T0)

    out = sim.engine.handle(UsersChanged((stored, newcomer)), T0 + 1)

    assert (held.points, held.last_seq, held.max_alerts_per_hour, held.banned_until) == (30, 7, 3, T0 + 60_000)
    assert [(a.conn_id, a.code) for a in out.actions if isinstance(a, Close)] == [(1, 4003)]
    assert sim.engine.users["newcomer"] == newcomer
    assert sim.engine.handle(UsersChanged((attrs.evolve(stored),)), T0 + 2).actions == ()  # banned already


def test_typing_and_presence_are_relayed_to_other_nodes_and_relayed_events_reach_this_nodes_room() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "watcher")
    qid = ask(sim)
    joined = sim.call(2, "join_question", {"question_id": qid})
    typing = sim.call(2, "typing_start", {"question_id": qid}, T0 + 1)
    sim.take(1)
    sim.take(2)

    relayed = [(a.kind, a.data["user_id"]) for o in (joined, typing) for a in o.actions if isinstance(a, RelayRoom)]
    assert relayed == [("user_online", "watcher"), ("user_typing", "watcher")]

    # Another node's: to this node's room, but not to that user's own connections here.
    remote = {"question_id": qid, "user_id": "watcher", "nick": "Watcher"}
    sim.deliver(sim.engine.handle(RoomRelayed(qid, "user_typing", remote), T0 + 2))
    assert (sim.take(1), sim.take(2)) == ([{"type": "user_typing", "data": remote}], [])
    answer = {"answer_id": "a-far", "content": "by the port"}
    sim.deliver(sim.engine.handle(RoomRelayed(qid, "new_answer", {"question_id": qid, "answer": answer}), T0 + 3))
    assert [f["data"]["answer"] for f in sim.take(1)] == [answer]
    assert [f["type"] for f in sim.take(2)] == ["new_answer"]
    for kind, data in (
        ("answer_accepted", {"question_id": qid, "answer_id": "a-far", "author_id": "far", "points": 10}),
        ("answer_deleted", {"question_id": qid, "answer_id": "a-far"}),
    ):
        sim.deliver(sim.engine.handle(RoomRelayed(qid, kind, data), T0 + 3))
        assert sim.take(1) == sim.take(2) == [{"type": kind, "data": data}]
    # Not a room here, another question's data, a kind not relayed, an answer by reference not in memory: nothing.
    for kind, question, data in (
        ("user_typing", "q-none", {**remote, "question_id": "q-none"}),
        ("user_typing", qid, {**remote, "question_id": "q-other"}),
        ("question_closed", qid, {"question_id": qid, "reason": "accepted"}),
        ("new_answer", qid, {"question_id": qid, "answer_id": "a-unknown"}),
    ):
        assert sim.engine.handle(RoomRelayed(question, kind, data), T0 + 4).actions == ()


def test_a_new_answer_relayed_by_reference_is_sent_from_memory() -> None:
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    qid = ask(sim)
    sim.take(1)
    far = Answer("a-far", qid, "local", "Local", "long", T0 + 1)
    stored = question_as_stored(sim, qid, status=QuestionStatus.ANSWERED, answer_count=1, first_answer_at=T0 + 1)
    sim.engine.handle(QuestionChanged(qid, stored, (far,)), T0 + 2)

    out = sim.engine.handle(RoomRelayed(qid, "new_answer", {"question_id": qid, "answer_id": "a-far"}), T0 + 3)
    sim.deliver(out)

    (frame,) = sim.take(1)
    assert (frame["type"], frame["data"]["answer"]["content"]) == ("new_answer", "long")


# ---- room members and typers on other nodes (CLUSTER.md, "Room members across nodes") ------------------------


def asker_and_watcher() -> tuple[Sim, str]:
    """An engine with "asker" on connection 1, in the room of the question they asked, and "watcher" on 2."""
    sim = Sim(make_engine())
    sim.connect(1, "asker")
    sim.connect(2, "watcher")
    return sim, ask(sim)


def joined_room(sim: Sim, conn_id: int, qid: str, now: int) -> dict[str, object]:
    data: dict[str, object] = sim.reply(sim.call(conn_id, "join_question", {"question_id": qid}, now))["data"]
    return {key: data[key] for key in ("online", "online_count", "typing")}


def card(user_id: str, nick: str | None = None) -> dict[str, str]:
    return {"user_id": user_id, "nick": nick or user_id.title()}


def test_a_join_reply_lists_the_rooms_members_on_every_node_once() -> None:
    """This node's members plus the replica's: a user in the room here and elsewhere counted once, a user the
    engine did not know adopted (their name), a room the replica empties or a rebuild leaves out has none."""
    sim, qid = asker_and_watcher()
    far = User("far", "Faraway")
    sim.engine.handle(RemoteMembers(((qid, ("asker", "far")), ("q-elsewhere", ("far",))), (far,)), T0 + 1)

    assert joined_room(sim, 2, qid, T0 + 2) == {
        "online": [card("asker"), card("far", "Faraway"), card("watcher")],
        "online_count": 3,
        "typing": [],
    }
    assert sim.engine.users["far"] == far

    sim.engine.handle(RemoteMembers(((qid, ()),)), T0 + 3)
    assert joined_room(sim, 2, qid, T0 + 4)["online_count"] == 2
    sim.engine.handle(RemoteMembers(((qid, ("far",)),)), T0 + 5)
    assert joined_room(sim, 2, qid, T0 + 6)["online_count"] == 3
    sim.engine.handle(RemoteMembers((), everyone=True), T0 + 7)  # a rebuild that lists no room
    assert joined_room(sim, 2, qid, T0 + 8)["online"] == [card("asker"), card("watcher")]
    assert sim.engine.presence.remote == {}


def test_other_nodes_typers_are_kept_until_they_stop_or_expire() -> None:
    """Relayed typing is kept even for a room with no member here, so a join reply lists it; a renewal
    extends it without telling the room again; it ends at its stop, or typing_ttl after it was last heard
    (3 s by default), exactly."""
    sim, qid = asker_and_watcher()
    sim.call(1, "leave_question", {"question_id": qid})
    sim.take(1)
    far = {"question_id": qid, **card("far", "Faraway")}
    sim.deliver(sim.engine.handle(RoomRelayed(qid, "user_typing", far), T0 + 1000))  # nobody in the room here
    assert sim.engine.presence.room_of(qid) is None
    assert joined_room(sim, 2, qid, T0 + 1001)["typing"] == [card("far", "Faraway")]
    sim.call(1, "join_question", {"question_id": qid}, T0 + 1001)
    sim.take(1)
    sim.take(2)

    renewal = sim.engine.handle(RoomRelayed(qid, "user_typing", far), T0 + 2000)
    assert renewal.actions == ()  # the room heard it start
    sim.deliver(sim.engine.handle(Tick(), T0 + 4999))
    assert joined_room(sim, 2, qid, T0 + 4999)["typing"] == [card("far", "Faraway")]
    sim.deliver(sim.engine.handle(Tick(), T0 + 5000))  # 3 s after the renewal
    assert sim.engine.presence.remote_typing == {}
    assert joined_room(sim, 2, qid, T0 + 5000)["typing"] == []
    assert [f["type"] for f in sim.take(1) + sim.take(2)] == ["reply", "reply"]  # nothing told: its node does

    sim.deliver(sim.engine.handle(RoomRelayed(qid, "user_typing", far), T0 + 6000))
    assert [f["type"] for f in sim.take(1) + sim.take(2)] == ["user_typing", "user_typing"]  # news again
    sim.deliver(sim.engine.handle(RoomRelayed(qid, "user_stop_typing", far), T0 + 6500))
    assert joined_room(sim, 2, qid, T0 + 6500)["typing"] == []
    assert sim.engine.presence.remote_typing == {}


def test_a_typers_renewals_reach_other_nodes_every_half_ttl_not_the_room_here() -> None:
    sim, qid = asker_and_watcher()
    sim.call(2, "join_question", {"question_id": qid}, T0)
    sim.take(1)
    relayed = []
    for at in (T0 + 100, T0 + 1000, T0 + 1599, T0 + 1600, T0 + 2500, T0 + 3100):
        out = sim.call(2, "typing_start", {"question_id": qid}, at)
        relayed += [at - T0 for a in out.actions if isinstance(a, RelayRoom) and a.kind == "user_typing"]

    assert relayed == [100, 1600, 3100]
    assert [f["type"] for f in sim.take(1)] == ["user_typing"]


def test_an_answer_read_on_another_node_gets_no_late_delivered_receipt_here() -> None:
    """A node that tracked an answer as not yet delivered learns from the store's news that the asker read it
    on another node: when the asker later comes back here (the question expired meanwhile), the author hears
    nothing more (receipts only move forward)."""
    a = Sim(Engine(CoreSettings(questions=QuestionSettings(ttl_s=60.0)), claims_for))
    b = Sim(Engine(CoreSettings(questions=QuestionSettings(ttl_s=60.0)), claims_for))

    def stored(sim: Sim, qid: str) -> QuestionChanged:
        held = attrs.evolve(sim.engine.questions[qid])
        return QuestionChanged(qid, held, tuple(attrs.evolve(x) for x in sim.engine.answers[qid].values()))

    a.connect(1, "asker")
    qid = ask(a)
    a.deliver(a.engine.handle(Disconnected(1), T0 + 1))
    b.engine.handle(stored(a, qid), T0 + 2)
    a.connect(2, "author", T0 + 3)
    answer = a.reply(a.call(2, "create_answer", {"question_id": qid, "content": "x"}, T0 + 4))["data"]["answer"]
    assert answer["state"] == "sent"  # the asker is offline: A tracks it
    b.engine.handle(stored(a, qid), T0 + 5)
    b.connect(10, "asker", T0 + 6)  # the asker comes back on B, and reads it there
    b.call(10, "mark_read", {"question_id": qid}, T0 + 7)
    a.engine.handle(stored(b, qid), T0 + 8)  # A merges the read receipt
    assert a.engine.answers[qid][answer["answer_id"]].state == "read"
    b.deliver(b.engine.handle(Disconnected(10), T0 + 9))
    a.take(2)
    a.deliver(a.engine.handle(Tick(), T0 + 61_000))  # expired: out of A's memory
    assert qid not in a.engine.questions
    hello = a.connect(3, "asker", T0 + 70_000)
    assert [f for f in a.take(2) if f.get("type") == "receipt"] == []
    assert not [w for w in hello.writes if isinstance(w, DeliverAnswer)]


def test_a_refused_stage_takes_its_alerts_back_and_ends_the_escalation() -> None:
    """A stage's outcome commits only while its question is open in the store (``IfOpen``); the ask's own
    IMMEDIATE does not need it. Refused (``StageRefused``: another node ended the question), its alerts
    no longer count against the hourly caps, at the time they were counted (the rest of a stage planned
    at +3 s, delivered at +30 s), the seq it gave last is taken back, and the escalation ends here."""
    counter = itertools.count(1)
    engine = Engine(CoreSettings(alerts_per_batch=1), claims_for, new_id=lambda prefix, now: f"{prefix}{next(counter)}")
    sim = Sim(engine)
    for conn_id, user in ((2, "first"), (3, "second")):
        sim.connect(conn_id, user)
        engine.users[user].local = True
        sim.call(conn_id, "update_settings", {"home": {"lat": 33.5, "lng": 126.51}})  # ~1 km east
        sim.deliver(engine.handle(Disconnected(conn_id), T0))
    sim.connect(1, "asker")
    asked = sim.call(1, "create_question", {"title": "t", "location": {"lat": 33.5, "lng": 126.5}})
    qid = sim.reply(asked)["data"]["question"]["question_id"]
    assert [w for w in asked.writes if isinstance(w, IfOpen)] == []

    quick = engine.handle(EscalationDue(qid), T0 + 3000)  # QUICK: one alert now, the other pending
    (first,) = [w.user_id for w in quick.writes if isinstance(w, AppendEvent)]
    second = "second" if first == "first" else "first"
    assert [w for w in quick.writes if isinstance(w, IfOpen)] == [IfOpen(qid, ((first, T0 + 3000),))]
    rest = engine.handle(EscalationDue(qid), T0 + 30_000)  # the rest of QUICK, and EXTENDED (nobody)
    (guard,) = [w for w in rest.writes if isinstance(w, IfOpen)]
    assert guard == IfOpen(qid, ((second, T0 + 3000),))
    (seq,) = [w.seq for w in rest.writes if isinstance(w, AppendEvent)]
    assert engine.users[second].last_seq == seq

    refused = engine.handle(StageRefused(qid, guard.alerted, ((second, seq),)), T0 + 30_001)

    assert [a for a in refused.actions if isinstance(a, CancelEscalation)] == [CancelEscalation(qid)]
    assert engine.where.ledger.count_last_hour(second, T0 + 30_001) == 0
    assert engine.where.ledger.count_last_hour(first, T0 + 30_001) == 1
    assert engine.users[second].last_seq == seq - 1
    assert engine.escalation_due(qid) is None and engine.where.alerted_count(qid) == 1
    assert engine.handle(EscalationDue(qid), T0 + 120_000).writes == ()
