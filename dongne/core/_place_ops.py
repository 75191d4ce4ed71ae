"""Engine operations about places, settings and oversight.

Split from ``engine.py`` to keep modules small: ``update_location``,
``nearby_questions``, ``nearby_locals``, ``get/update_settings``,
``trending``, and the admin views (``hotspots``, ``metrics``, the dashboard
overview). A mixin of ``Engine``: the methods use its state directly.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import attrs

from .effects import OutcomeBuilder, SaveUser
from .errors import ProtocolError
from .escalation import NotificationSettings
from .lifecycle import ACTIVE
from .protocol import Fields, Request, event
from .records import Question, User

if TYPE_CHECKING:
    from .engine import ConnState, RegionLookup
    from .neighbourhood import Neighbourhood
    from .slo import SloTracker

__all__ = ["PlaceOps"]


class PlaceOps:
    """Location, settings and oversight operations (mixed into ``Engine``)."""

    if TYPE_CHECKING:
        _region_of: RegionLookup | None
        where: Neighbourhood
        questions: dict[str, Question]
        user_conns: dict[str, set[int]]
        conns: dict[int, ConnState]
        slo: SloTracker
        recent_alerts: deque[dict[str, Any]]

    # ---- location ----------------------------------------------------------------

    def _in_service(self, lat: float, lng: float) -> str | None:
        if self._region_of is None:
            return None
        region = self._region_of(lat, lng)
        if region is None:
            raise ProtocolError("outside_service_area", "this location is outside the service area")
        return region

    def _op_update_location(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        lat, lng = f.location()
        if f.has("accuracy_m"):
            f.number("accuracy_m", minimum=0.0, maximum=100_000.0)
        region = self._in_service(lat, lng)
        wait = self.where.retry_after_ms(user.user_id, now)
        if wait > 0:
            raise ProtocolError("rate_limited", "location updates are too frequent", retry_after_ms=wait)
        slat, slng = self.where.move(user, lat, lng, region, now)
        nearby = self.where.nearby_questions(slat, slng, self.questions, now, exclude_asker=user.user_id)
        ids = tuple(q.question_id for q, _ in nearby)
        if self.where.nearby_seen.get(user.user_id) != ids:
            self.where.nearby_seen[user.user_id] = ids
            out.send(self.user_conns.get(user.user_id, ()), event("nearby_questions", self._nearby_wire(nearby)))
        return {"location": {"lat": slat, "lng": slng}, "region": region, "live": user.local}

    def _nearby_wire(self, nearby: list[tuple[Question, float]]) -> dict[str, Any]:
        return {
            "questions": [
                {
                    **self.where.brief(q),
                    "distance_m": round(d, 1),
                    "status": q.status.value,
                    "answer_count": q.answer_count,
                }
                for q, d in nearby
            ]
        }

    def _position_or_given(self, user: User, f: Fields) -> tuple[float, float]:
        if f.has("location"):
            lat, lng = f.location()
            self._in_service(lat, lng)
            return lat, lng
        known = self.where.positions.get(user.user_id)
        if known is None:
            raise ProtocolError("invalid_field", "'location' is required (no position was shared yet)")
        return known[0], known[1]

    def _op_nearby_questions(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        lat, lng = self._position_or_given(user, f)
        return self._nearby_wire(self.where.nearby_questions(lat, lng, self.questions, now, exclude_asker=user.user_id))

    def _op_nearby_locals(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        lat, lng = self._position_or_given(user, f)
        live = self.where.live
        return {"within_2km": live.count_within(lat, lng, 2000.0), "within_5km": live.count_within(lat, lng, 5000.0)}

    def _op_get_settings(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        return {"settings": user.settings_wire()}

    def _op_update_settings(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        current = NotificationSettings(user.immediate_alerts, user.quiet_hours, user.max_alerts_per_hour)
        wire = {
            k: v for k, v in request.data.items() if k in ("immediate_alerts", "quiet_hours", "max_alerts_per_hour")
        }
        try:
            settings = NotificationSettings.from_wire(wire, base=current)
        except ValueError as exc:
            raise ProtocolError("invalid_field", str(exc)) from None
        home = user.home
        if "home" in request.data:
            if request.data["home"] is None:
                home = None
            else:
                lat, lng = f.location("home")
                self._in_service(lat, lng)
                home = (lat, lng)
        user.immediate_alerts = settings.immediate_alerts
        user.quiet_hours = settings.quiet_hours
        user.max_alerts_per_hour = settings.max_alerts_per_hour
        user.home = home
        self.where.refresh_local(user)
        out.write(SaveUser(attrs.evolve(user)))
        return {"settings": user.settings_wire()}

    def _op_trending(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        region = f.string("region", max_len=64) if f.has("region") else None
        n = f.integer("limit", minimum=1, maximum=50, default=10)
        return self.where.trending.snapshot(region, now, n)

    def _op_hotspots(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        if user.role != "admin":
            raise ProtocolError("forbidden", "hotspots is an admin operation")
        n = f.integer("limit", minimum=1, maximum=100, default=10)
        return self.where.hotspots.snapshot(now, self.where.online_locals_by_region(), n)

    def _op_metrics(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        if user.role != "admin":
            raise ProtocolError("forbidden", "metrics is an admin operation")
        return {"slo": self.slo.snapshot(now), "recent_alerts": list(self.recent_alerts)[:10], **self.counts()}

    # ---- overview (ops port, admin dashboard) -------------------------------------

    def counts(self) -> dict[str, int]:
        return {
            "connections": len(self.conns),
            "users_online": len(self.user_conns),
            "locals_online": len(self.where.live),
            "open_questions": sum(1 for q in self.questions.values() if q.status in ACTIVE),
        }

    def overview(self, now: int) -> dict[str, Any]:
        """What the admin dashboard shows: open questions, per-region SLO and locals, alerts."""
        stages = self.where.stages
        open_questions = []
        for q in sorted((q for q in self.questions.values() if q.status in ACTIVE), key=lambda q: q.created_at):
            esc = self.where.escalations.get(q.question_id)
            if esc is None:
                stage = stages[-1].name if stages else None
            else:
                stage = stages[esc.next_stage - 1].name if esc.next_stage > 0 else None
            open_questions.append(
                {
                    **self.where.brief(q),
                    "age_s": round((now - q.created_at) / 1000, 1),
                    "stage": stage,
                    "answer_count": q.answer_count,
                    "status": q.status.value,
                    "alerted": q.alerted_at is not None,
                }
            )
        return {
            "now": now,
            **self.counts(),
            "locals_by_region": self.where.online_locals_by_region(),
            "slo": self.slo.snapshot(now),
            "open": open_questions[-200:],
            "alerts": list(self.recent_alerts)[:20],
            "hotspots": self.where.hotspots.snapshot(now, self.where.online_locals_by_region(), 10),
        }
