"""Operations about places and the user's own settings.

``update_location``, ``nearby_questions``, ``nearby_locals``,
``get_settings``/``update_settings``, ``trending`` and the admin's
``hotspots``. The state they read and change lives in ``Neighbourhood``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .connections import Call
from .effects import SaveUser
from .errors import ProtocolError
from .escalation import NotificationSettings
from .neighbourhood import Neighbourhood
from .protocol import Fields, event
from .records import Question, User

__all__ = ["Places", "RegionLookup", "ServiceArea"]

RegionLookup = Callable[[float, float], "str | None"]


class ServiceArea:
    """Which region a point is in; points outside the service area are refused.

    Args:
        region_of: names the region of a point, ``None`` outside; when
            omitted every point is in service (and in no region).
    """

    def __init__(self, region_of: RegionLookup | None) -> None:
        self._region_of = region_of

    def region(self, lat: float, lng: float) -> str | None:
        """The point's region; raises ``outside_service_area``."""
        if self._region_of is None:
            return None
        region = self._region_of(lat, lng)
        if region is None:
            raise ProtocolError("outside_service_area", "this location is outside the service area")
        return region


class Places:
    """The place and settings operations.

    Args:
        where: positions, open questions, trending and hotspots.
        area: the service area.
        questions: every question in memory (shared with the engine).
        user_conns: each online user's connection ids (shared with the engine).
    """

    def __init__(
        self,
        where: Neighbourhood,
        area: ServiceArea,
        questions: dict[str, Question],
        user_conns: dict[str, set[int]],
    ) -> None:
        self._where = where
        self._area = area
        self._questions = questions
        self._user_conns = user_conns

    def operations(self) -> dict[str, Callable[[Call], dict[str, Any]]]:
        return {
            "update_location": self.update_location,
            "nearby_questions": self.nearby_questions,
            "nearby_locals": self.nearby_locals,
            "get_settings": self.get_settings,
            "update_settings": self.update_settings,
            "trending": self.trending,
            "hotspots": self.hotspots,
        }

    def update_location(self, call: Call) -> dict[str, Any]:
        user, f, now, where = call.user, call.f, call.now, self._where
        lat, lng = f.location()
        if f.has("accuracy_m"):
            f.number("accuracy_m", minimum=0.0, maximum=100_000.0)
        region = self._area.region(lat, lng)
        wait = where.retry_after_ms(user.user_id, now)
        if wait > 0:
            raise ProtocolError("rate_limited", "location updates are too frequent", retry_after_ms=wait)
        slat, slng = where.move(user, lat, lng, region, now)
        nearby = where.nearby_questions(slat, slng, self._questions, now, exclude_asker=user.user_id)
        ids = tuple(q.question_id for q, _ in nearby)
        if where.nearby_seen.get(user.user_id) != ids:
            where.nearby_seen[user.user_id] = ids
            call.out.send(self._user_conns.get(user.user_id, ()), event("nearby_questions", self._nearby_wire(nearby)))
        return {"location": {"lat": slat, "lng": slng}, "region": region, "live": user.local}

    @staticmethod
    def _nearby_wire(nearby: list[tuple[Question, float]]) -> dict[str, Any]:
        # Neighbourhood.brief's keys, in its order, then the list's own: one
        # literal, not a brief merged into a second dict (a move sends this).
        return {
            "questions": [
                {
                    "question_id": q.question_id,
                    "title": q.title,
                    "location": {"lat": q.lat, "lng": q.lng},
                    "region": q.region,
                    "hashtags": list(q.hashtags),
                    "urgency": q.urgency,
                    "created_at": q.created_at,
                    "asker_nick": q.asker_nick,
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
            self._area.region(lat, lng)
            return lat, lng
        known = self._where.positions.get(user.user_id)
        if known is None:
            raise ProtocolError("invalid_field", "'location' is required (no position was shared yet)")
        return known[0], known[1]

    def nearby_questions(self, call: Call) -> dict[str, Any]:
        lat, lng = self._position_or_given(call.user, call.f)
        nearby = self._where.nearby_questions(lat, lng, self._questions, call.now, exclude_asker=call.user.user_id)
        return self._nearby_wire(nearby)

    def nearby_locals(self, call: Call) -> dict[str, Any]:
        lat, lng = self._position_or_given(call.user, call.f)
        live = self._where.live
        return {"within_2km": live.count_within(lat, lng, 2000.0), "within_5km": live.count_within(lat, lng, 5000.0)}

    def get_settings(self, call: Call) -> dict[str, Any]:
        return {"settings": call.user.settings_wire()}

    def update_settings(self, call: Call) -> dict[str, Any]:
        user, data = call.user, call.request.data
        current = NotificationSettings(user.immediate_alerts, user.quiet_hours, user.max_alerts_per_hour)
        wire = {k: v for k, v in data.items() if k in ("immediate_alerts", "quiet_hours", "max_alerts_per_hour")}
        try:
            settings = NotificationSettings.from_wire(wire, base=current)
        except ValueError as exc:
            raise ProtocolError("invalid_field", str(exc)) from None
        home = user.home
        if "home" in data:
            if data["home"] is None:
                home = None
            else:
                lat, lng = call.f.location("home")
                self._area.region(lat, lng)
                home = (lat, lng)
        user.immediate_alerts = settings.immediate_alerts
        user.quiet_hours = settings.quiet_hours
        user.max_alerts_per_hour = settings.max_alerts_per_hour
        user.home = home
        self._where.refresh_local(user, call.now)
        call.out.write(SaveUser(attrs.evolve(user), changed={"settings"}))
        return {"settings": user.settings_wire()}

    def trending(self, call: Call) -> dict[str, Any]:
        f = call.f
        region = f.string("region", max_len=64) if f.has("region") else None
        n = f.integer("limit", minimum=1, maximum=50, default=10)
        return self._where.trending.snapshot(region, call.now, n)

    def hotspots(self, call: Call) -> dict[str, Any]:
        if call.user.role != "admin":
            raise ProtocolError("forbidden", "hotspots is an admin operation")
        n = call.f.integer("limit", minimum=1, maximum=100, default=10)
        return self._where.hotspots.snapshot(call.now, self._where.online_locals_by_region(), n)
