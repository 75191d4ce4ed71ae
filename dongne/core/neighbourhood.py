"""The location side of the engine: who is where, and who gets told.

Holds the live R-tree of online locals, locals' home positions, the open
questions' positions, each open question's escalation progress, the hourly
alert ledger, hotspots and trending hashtags. Pure state and rules: the
engine calls it with ``now`` and turns its answers into writes and frames.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import attrs

from .escalation import (
    PRIORITY_CRITICAL,
    AlertLedger,
    LocalInfo,
    NotificationSettings,
    QuestionBrief,
    StagePlan,
    in_quiet_hours,
)
from .geo import snap_position
from .hotspots import HotspotTracker
from .lifecycle import ACTIVE
from .planner import Hit, alert_style, plan_hits
from .records import Question, User
from .regions import Hotspot
from .settings import LocationSettings
from .spatial import LocalsIndex
from .trending import TrendingHashtags

__all__ = ["Escalation", "Neighbourhood"]


@attrs.define
class Escalation:
    """How far one question's escalation got."""

    next_stage: int = 0
    notified: set[str] = attrs.Factory(set)
    # A stage is planned at once and delivered in batches: the stage being
    # delivered, its alerts' (priority, sound, vibration) and its targets
    # not alerted yet, ``(user_id, distance_m, online)``, nearest first.
    delivering: StagePlan | None = None
    style: tuple[str, str, str] = ("", "", "")
    pending: list[Hit] = attrs.Factory(list)
    planned_at: int = 0  # when the stage being delivered was planned (its targets' alerts counted from then)
    # Alerts the next stage had sent before a restart or reload cut it short (its progress is saved with its
    # last batch): planned again, it is planned for what its limit leaves.
    resumed: int = 0


class Neighbourhood:
    """Positions, escalation progress and live analytics.

    Args:
        settings: the ``[location]`` settings.
        stages: the escalation plan.
        hotspots: named places, for hotspot statistics.
    """

    def __init__(
        self, settings: LocationSettings, stages: tuple[StagePlan, ...], hotspots: Iterable[Hotspot] = ()
    ) -> None:
        self.settings = settings
        self.stages = stages
        # The nearby stage with the smallest share of the hourly cap (QUICK in
        # the default plan): online locals with no room left under it are
        # snoozed in ``live`` until they have room again (see _snooze), and
        # nearby stages with that share skip them in bulk.
        self._snooze_stage = min((s for s in stages if s.audience == "nearby"), key=lambda s: s.cap_share, default=None)
        self._named_places = tuple(hotspots)
        # Live: who is where now (rebuilt by the clients, never stored).
        self.live = LocalsIndex()  # online locals' live positions
        self.positions: dict[str, tuple[float, float, str | None]] = {}  # user -> snapped lat, lng, region
        self.last_move: dict[str, int] = {}
        self.nearby_seen: dict[str, tuple[str, ...]] = {}  # user -> question ids last sent
        # Users other nodes place (several nodes on PostgreSQL; CLUSTER.md): lat, lng as the store holds
        # them. Locals among them are in ``live`` unless connected here (``positions`` wins then).
        # Users connected to other nodes (RemotePositions): where they are, or None when they shared no position.
        self.remote: dict[str, tuple[float, float] | None] = {}
        self.remote_regions: dict[str, str] = {}  # their regions, as the node that placed them named them
        self.forget_durable()

    def forget_durable(self) -> None:
        """Drop everything derived from stored records (to be loaded again); live positions stay."""
        self.live.wake_all()  # the ledger starts over: nobody may stay snoozed on the old one
        self.homes = LocalsIndex()  # locals' home positions
        self.open_questions = LocalsIndex()  # active questions' positions
        self.locals: dict[str, LocalInfo] = {}
        self.escalations: dict[str, Escalation] = {}
        # How many locals were alerted for each question whose every stage
        # has run: its Escalation, with the set of who, is dropped then.
        self.alerted_counts: dict[str, int] = {}
        # Active questions whose escalation was stopped for good (its asker banned, the question hidden):
        # how many stages it had run (stored, records.stopped_for_good; nothing takes them up again).
        self.stopped: dict[str, int] = {}
        self.ledger = AlertLedger()
        self.hotspots = HotspotTracker(
            window_ms=int(self.settings.hotspot_window_s * 1000),
            cell_m=self.settings.hotspot_cell_m,
            hotspots=self._named_places,
        )
        self.trending = TrendingHashtags()

    # ---- people ------------------------------------------------------------------

    def refresh_local(self, user: User, now: int) -> None:
        """Keep a user's ``LocalInfo`` (and home position) in step with its profile (a local banned at ``now``
        is none; one whose ban has run out is one again)."""
        if not user.local or user.banned_at(now):
            if self.locals.pop(user.user_id, None) is not None:
                self._drop_target(user.user_id)
            self.homes.remove(user.user_id)
            self.live.remove(user.user_id)
            return
        before = self.locals.get(user.user_id)
        settings = NotificationSettings(user.immediate_alerts, user.quiet_hours, user.max_alerts_per_hour)
        self.locals[user.user_id] = LocalInfo(
            user_id=user.user_id, tags=frozenset(user.tags), home=user.home, settings=settings
        )
        if before is not None and before.settings != settings:
            self._drop_refused(user.user_id, before.settings, settings, now)
        if user.home is not None:
            self.homes.upsert(user.user_id, *user.home)
        else:
            self.homes.remove(user.user_id)
        elsewhere = self.remote.get(user.user_id)
        if elsewhere is not None and user.user_id not in self.positions:
            self.live.upsert(user.user_id, *elsewhere)
        self._snooze(user.user_id)  # a new cap may give room sooner, or later

    def retry_after_ms(self, user_id: str, now: int) -> int:
        """How long until this user's next location update is accepted (0: now)."""
        last = self.last_move.get(user_id)
        gap = int(self.settings.min_update_interval_s * 1000)
        if last is None or now - last >= gap:
            return 0
        return last + gap - now

    def move(self, user: User, lat: float, lng: float, region: str | None, now: int) -> tuple[float, float]:
        """Record a user's position (snapped to ``precision_m``); locals enter the live index."""
        slat, slng = snap_position(lat, lng, self.settings.precision_m)
        self.positions[user.user_id] = (slat, slng, region)
        self.last_move[user.user_id] = now
        if user.local:
            entering = user.user_id not in self.live
            self.live.upsert(user.user_id, slat, slng)
            if entering:
                self._snooze(user.user_id)
        return slat, slng

    def _snooze(self, user_id: str) -> None:
        """Snooze a live local in ``live`` until they have room under the snooze stage's cap (``-inf``: they have).

        The exact rule still runs on everyone a query returns: a snooze only
        spares the planner the locals it would refuse anyway, so it must never
        outlast the user's true time; it is set from the ledger at every alert
        and settings change, and dropped when the ledger starts over.
        """
        stage = self._snooze_stage
        info = self.locals.get(user_id)
        if stage is None or info is None or user_id not in self.live:
            return
        cap = stage.cap_for(info.settings.max_alerts_per_hour)
        self.live.snooze(user_id, self.ledger.room_again_at(user_id, cap))

    def went_offline(self, user_id: str) -> None:
        """The user's last connection closed: it leaves the live index (unless another node places it)."""
        self.live.remove(user_id)
        self.positions.pop(user_id, None)
        self.nearby_seen.pop(user_id, None)
        # A client that reconnects shares its position again at once.
        self.last_move.pop(user_id, None)
        elsewhere = self.remote.get(user_id)
        if elsewhere is not None and user_id in self.locals:
            self.live.upsert(user_id, *elsewhere)
            self._snooze(user_id)

    def remote_moved(
        self,
        moved: Iterable[tuple[str, float | None, float | None, str | None]],
        gone: Iterable[str],
        *,
        everyone: bool = False,
    ) -> None:
        """Other nodes' positions (``events.RemotePositions``): locals among them enter or leave ``live``; a
        position None is a user connected there who shared none (online, for pushes, but not placed).

        A user connected here keeps the position this node has while connected; the remote one is kept
        for when they leave. ``everyone``: ``moved`` is all of them; any remote user not in it is gone.
        """
        moved = list(moved)
        if everyone:
            listed = {row[0] for row in moved}
            gone = [user_id for user_id in self.remote if user_id not in listed]
        for user_id in gone:
            self.remote_regions.pop(user_id, None)
            if user_id in self.remote and self.remote.pop(user_id) is not None and user_id not in self.positions:
                self.live.remove(user_id)
        for user_id, lat, lng, region in moved:
            if region is None:
                self.remote_regions.pop(user_id, None)
            else:
                self.remote_regions[user_id] = region
            if lat is None or lng is None:  # connected elsewhere without a position: online, not placed
                if self.remote.get(user_id) is not None and user_id not in self.positions:
                    self.live.remove(user_id)
                self.remote[user_id] = None
                continue
            self.remote[user_id] = (lat, lng)
            if user_id in self.positions or user_id not in self.locals:
                continue
            entering = user_id not in self.live
            self.live.upsert(user_id, lat, lng)
            if entering:
                self._snooze(user_id)

    def connected_elsewhere(self, user_id: str) -> bool:
        """Whether another node has a connection of the user's (as its last batch of positions said)."""
        return user_id in self.remote

    def online(self, here: AbstractSet[str]) -> AbstractSet[str]:
        """Who is online: ``here`` (users connected to this node) and users other nodes place."""
        return here if not self.remote else _Either(here, self.remote.keys())

    def online_locals_by_region(self) -> dict[str, int]:
        """Online locals with a position, by region: this node's and those other nodes place."""
        counts: Counter[str] = Counter()
        for user_id, (_lat, _lng, region) in self.positions.items():
            if region is not None and user_id in self.live:
                counts[region] += 1
        for user_id, region in self.remote_regions.items():
            if user_id not in self.positions and user_id in self.live:
                counts[region] += 1
        return dict(counts)

    # ---- questions -----------------------------------------------------------------

    def question_asked(self, question: Question) -> None:
        """Count a question in hotspots and trending hashtags, at the time it was asked, once (an ended one as
        ended): whenever it comes into memory, created here, read back at start-up, unhidden or another node's."""
        qid = question.question_id
        self.hotspots.record_question(
            qid, question.asker_id, question.lat, question.lng, question.region, question.created_at
        )
        if question.status not in ACTIVE:
            self.hotspots.question_resolved(qid)
        self.trending.record(question.region, question.hashtags, question.created_at, key=qid)

    def question_opened(self, question: Question) -> None:
        """An active question: nearby, and counted (:meth:`question_asked`)."""
        self.open_questions.upsert(question.question_id, question.lat, question.lng)
        self.question_asked(question)

    def question_withdrawn(self, question_id: str) -> None:
        """A question deleted or hidden stops counting in hotspots and trending hashtags (it has ended too)."""
        self.hotspots.forget(question_id)
        self.trending.forget(question_id)

    def question_ended(self, question_id: str) -> None:
        self.open_questions.remove(question_id)
        self.stop_escalation(question_id)
        self.alerted_counts.pop(question_id, None)
        self.stopped.pop(question_id, None)
        self.hotspots.question_resolved(question_id)

    def nearby_questions(
        self, lat: float, lng: float, questions: dict[str, Question], now: int, *, exclude_asker: str | None = None
    ) -> list[tuple[Question, float]]:
        """Open questions asked within ``nearby_max_age_s`` and ``nearby_radius_m``, nearest first."""
        oldest = now - int(self.settings.nearby_max_age_s * 1000)
        wanted = self.settings.nearby_max
        radius = self.settings.nearby_radius_m

        def pick(hits: list[tuple[str, float]]) -> list[tuple[Question, float]]:
            out: list[tuple[Question, float]] = []
            for question_id, distance in hits:
                question = questions.get(question_id)
                if question is None or question.status not in ACTIVE or question.created_at < oldest:
                    continue
                if question.asker_id == exclude_asker:
                    continue
                out.append((question, distance))
                if len(out) >= wanted:
                    break
            return out

        # Every move asks this; in a busy area hundreds of open questions are
        # within reach. The nearest few usually qualify (open, recent, not
        # one's own): look at one more than wanted, then at twice as many,
        # nearest first, and scan everything in reach only when too many of
        # those did not. (Any that qualify beyond the first k are farther
        # than the ones found among them.)
        for k in (wanted + 1, 2 * wanted + 2):
            hits = self.open_questions.nearest_within(lat, lng, radius, k)
            found = pick(hits)
            if len(found) == wanted or len(hits) < k:
                return found
        return pick(self.open_questions.within(lat, lng, radius))

    # ---- escalation ------------------------------------------------------------------

    def escalation_due(self, question: Question) -> int | None:
        """When the question's next stage is due (ms), or None when none is left."""
        esc = self.escalations.get(question.question_id)
        if esc is None or question.status not in ACTIVE:
            return None
        if esc.delivering is not None:
            return question.created_at + int(esc.delivering.offset_s * 1000)
        if esc.next_stage >= len(self.stages):
            return None
        return question.created_at + int(self.stages[esc.next_stage].offset_s * 1000)

    def run_stage(self, question: Question, online: AbstractSet[str], now: int) -> tuple[StagePlan, list[Hit]]:
        """Plan the next stage, mark its targets notified and advance the question's escalation.

        Returns the stage and its targets, ``(user_id, distance_m, online)``
        nearest first (``planner.plan_hits``); their alerts' priority, sound
        and vibration are ``planner.alert_style``'s.
        """
        esc = self.escalations[question.question_id]
        stage = self.stages[esc.next_stage]
        planned: StagePlan | None = stage
        if esc.resumed and stage.limit is not None:
            planned = attrs.evolve(stage, limit=stage.limit - esc.resumed) if stage.limit > esc.resumed else None
        esc.resumed = 0
        brief = QuestionBrief.from_record(question)
        hits = (
            []
            if planned is None
            else plan_hits(
                planned,
                brief,
                live=self.live,
                locals=self.locals,
                online=self.online(online),
                notified=esc.notified | {question.asker_id},
                ledger=self.ledger,
                now_ms=now,
                utc_offset_minutes=self.settings.utc_offset_minutes,
                homes=self.homes,
                awake_at=now if stage.audience == "nearby" and stage.cap_share == self._snooze_share() else None,
            )
        )
        alerted = [hit[0] for hit in hits]
        esc.notified.update(alerted)
        esc.planned_at = now
        self.ledger.record_users(alerted, now)
        for user_id in alerted:
            self._snooze(user_id)
        esc.next_stage += 1
        esc.style = alert_style(stage, brief)
        return stage, hits

    def remote_alerts(self, alerts: Iterable[tuple[str, int, Iterable[str]]]) -> None:
        """Count alerts another node sent (``RemoteAlerts``): ``(question_id, at, user ids)``.

        Only for questions whose escalation is followed here, and only users
        not yet alerted for it: who is in ``notified`` is counted already (by
        ``run_stage``, a reload, or a take-up that read the store), so news
        read after the store never counts an alert twice. A question not
        followed yet has its alerts counted when its escalation is taken up.
        """
        for question_id, at, user_ids in alerts:
            esc = self.escalations.get(question_id)
            if esc is None:
                continue
            fresh = [user_id for user_id in user_ids if user_id not in esc.notified]
            if not fresh:
                continue
            esc.notified.update(fresh)
            self.ledger.record_users(fresh, at)
            for user_id in fresh:
                self._snooze(user_id)

    def _snooze_share(self) -> float | None:
        return None if self._snooze_stage is None else self._snooze_stage.cap_share

    def stage_reached(self, question_id: str) -> str | None:
        """The last stage planned for a question: ``None`` before its first, the plan's last once all ran;
        for an escalation stopped for good, the last one run before it stopped."""
        esc = self.escalations.get(question_id)
        if esc is not None:
            run = esc.next_stage
        else:
            run = self.stopped.get(question_id, len(self.stages))
        # A plan shortened since (config.toml, then a restart) has fewer stages than the store counted.
        run = min(run, len(self.stages))
        return self.stages[run - 1].name if run > 0 else None

    def drop_pending(self, esc: Escalation) -> None:
        """The rest of the stage being delivered is not sent (the question was answered, or ended): its
        targets were counted as alerted when it was planned, and are not any more (caps, never twice)."""
        for user_id, _, _ in esc.pending:
            esc.notified.discard(user_id)
            self.ledger.unrecord(user_id, esc.planned_at)
            self._snooze(user_id)
        esc.pending.clear()

    def _drop_target(self, user_id: str) -> None:
        """A local no more (banned, say: "alerted for nothing"): the stages being delivered leave them out of
        their batches still to send, and take their alert back as :meth:`drop_pending` does."""
        for esc in self.escalations.values():
            if any(hit[0] == user_id for hit in esc.pending):
                self._take_out(esc, user_id)

    def _take_out(self, esc: Escalation, user_id: str) -> None:
        """Leave ``user_id`` out of the batches of ``esc``'s stage still to send, and take their alert back."""
        esc.pending[:] = [hit for hit in esc.pending if hit[0] != user_id]
        esc.notified.discard(user_id)
        self.ledger.unrecord(user_id, esc.planned_at)

    def _drop_refused(self, user_id: str, before: NotificationSettings, after: NotificationSettings, now: int) -> None:
        """A local changed their settings: the stages being delivered leave them out of their batches still to
        send where the change refuses what the old settings allowed, and take their alert back as
        :meth:`_drop_target` does. Who was planned under the new settings is the planner's business."""
        offset = self.settings.utc_offset_minutes
        quiet_begun = after.quiet_hours != before.quiet_hours and in_quiet_hours(after.quiet_hours, now, offset)
        for esc in self.escalations.values():
            stage = esc.delivering
            if stage is None or not any(hit[0] == user_id for hit in esc.pending):
                continue
            if self._refuses(stage, esc, user_id, before, after, quiet_begun, now):
                self._take_out(esc, user_id)

    def _refuses(
        self,
        stage: StagePlan,
        esc: Escalation,
        user_id: str,
        before: NotificationSettings,
        after: NotificationSettings,
        quiet_begun: bool,
        now: int,
    ) -> bool:
        """Whether a settings change refuses a planned alert: immediate alerts switched off (for a stage that
        needs them), quiet hours that have begun (not for an urgent question: its alerts are ``critical``,
        ``alert_style``), a lower cap they have reached (0 mutes)."""
        if stage.requires_immediate_alerts and before.immediate_alerts and not after.immediate_alerts:
            return True
        if quiet_begun and esc.style[0] != PRIORITY_CRITICAL:
            return True
        cap = stage.cap_for(after.max_alerts_per_hour)
        if cap >= stage.cap_for(before.max_alerts_per_hour):
            return False
        # Their alert of this stage was counted when it was planned: it does not count against it.
        own = 1 if esc.planned_at > now - self.ledger.window_ms else 0
        return self.ledger.count_last_hour(user_id, now) - own >= cap

    def stop_escalation(self, question_id: str) -> Escalation | None:
        """Stop a question's escalation here (it ended, or was stopped for good); what it had not sent yet
        is taken back (:meth:`drop_pending`). Returns it, if it had one."""
        esc = self.escalations.pop(question_id, None)
        if esc is not None:
            self.drop_pending(esc)
        return esc

    def stage_refused(self, question_id: str, alerted: Iterable[tuple[str, int]]) -> bool:
        """A stage's commit was refused: the question ended in the store (``IfOpen``). Its alerts,
        ``(user_id, when the caps counted it)``, are taken back as :meth:`drop_pending` takes back what was
        not sent, and the question's escalation ends here. Returns whether it was still running."""
        esc = self.stop_escalation(question_id)
        taken = set()
        for user_id, at in alerted:
            self.ledger.unrecord(user_id, at)
            self._snooze(user_id)
            taken.add(user_id)
        if esc is not None:
            self.alerted_counts[question_id] = len(esc.notified - taken)
        elif question_id in self.alerted_counts:  # the refused stage was its last, or an earlier one was refused
            self.alerted_counts[question_id] -= len(taken)
        return esc is not None

    def stop_for_good(self, question_id: str) -> int | None:
        """Stop a question's escalation for good (:meth:`stop_escalation`), its stages run kept for
        :meth:`stage_reached`: returns how many, or None if it had no escalation (a question whose every stage
        has run counts as having run them all)."""
        esc = self.stop_escalation(question_id)
        if esc is not None:
            run = min(esc.next_stage, len(self.stages))
        elif question_id in self.alerted_counts:
            run = len(self.stages)
        else:
            return None
        self.stopped[question_id] = run
        return run

    def escalation_done(self, question_id: str) -> None:
        """Every stage of the question has run: keep how many locals were alerted, drop who."""
        esc = self.escalations.pop(question_id, None)
        if esc is not None:
            self.alerted_counts[question_id] = len(esc.notified)

    def alerted_count(self, question_id: str) -> int | None:
        """How many locals the question's escalation alerted; ``None`` if it has none (never started, stopped)."""
        esc = self.escalations.get(question_id)
        if esc is not None:
            return len(esc.notified)
        return self.alerted_counts.get(question_id)

    def restore_escalation(
        self, question_id: str, next_stage: int, notified: Iterable[str], per_stage: Mapping[str, int] | None = None
    ) -> None:
        """A question's escalation as the store holds it; ``per_stage``: how many were alerted in each stage.
        More stages run than the plan has (it was shortened since): every stage has run."""
        next_stage = min(next_stage, len(self.stages))
        esc = self.escalations[question_id] = Escalation(next_stage, set(notified))
        if per_stage and next_stage < len(self.stages):
            esc.resumed = per_stage.get(self.stages[next_stage].name, 0)

    # ---- wire shapes ------------------------------------------------------------------

    @staticmethod
    def brief(question: Question) -> dict[str, Any]:
        return {
            "question_id": question.question_id,
            "title": question.title,
            "location": {"lat": question.lat, "lng": question.lng},
            "region": question.region,
            "hashtags": list(question.hashtags),
            "urgency": question.urgency,
            "created_at": question.created_at,
            "asker_nick": question.asker_nick,
        }


class _Either(AbstractSet[str]):
    """Two sets seen as their union, without copying either (``in`` is all the planner asks)."""

    def __init__(self, first: AbstractSet[str], second: AbstractSet[str]) -> None:
        self._first = first
        self._second = second

    def __contains__(self, item: object) -> bool:
        return item in self._first or item in self._second

    def __iter__(self) -> Iterator[str]:
        yield from self._first
        yield from (item for item in self._second if item not in self._first)

    def __len__(self) -> int:
        return sum(1 for _ in self)
