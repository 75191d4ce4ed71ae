"""The settings the core reads, as frozen values.

``dongne.config`` reads them from ``config.toml`` and the environment; the core
only sees these classes, so it imports nothing outside itself. A value out of
range raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

import attrs

from .errors import ConfigError
from .escalation import DEFAULT_STAGES, StagePlan, stages_from_config
from .text import DEFAULT_SPAM_PATTERNS

__all__ = [
    "AlertSettings",
    "ContentSettings",
    "CoreSettings",
    "EngineSettings",
    "LimitSettings",
    "LocationSettings",
    "ModerationSettings",
    "QuestionSettings",
    "positive",
    "positive_or_inf",
]


def positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{attribute.name} must be a positive number, got {value!r}")


def positive_or_inf(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:  # also refuses NaN; inf turns the timer off
        raise ConfigError(f"{attribute.name} must be a positive number (or inf for never), got {value!r}")


def _patterns(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    for pattern in value:
        if not isinstance(pattern, str):
            raise ConfigError(f"{attribute.name}: every pattern must be a string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{attribute.name}: bad regular expression {pattern!r}: {exc}") from None


def _networks(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    for entry in value:
        try:
            ipaddress.ip_network(str(entry), strict=False)
        except ValueError:
            raise ConfigError(f"{attribute.name}: {entry!r} is not an IP address or CIDR network") from None


@attrs.frozen
class EngineSettings:
    accept_points: int = attrs.field(default=10, validator=attrs.validators.ge(0))
    typing_ttl_s: float = attrs.field(default=3.0, validator=positive)
    title_max: int = attrs.field(default=200, validator=positive)
    body_max: int = attrs.field(default=1000, validator=positive)
    answer_max: int = attrs.field(default=2000, validator=positive)
    hashtags_max: int = attrs.field(default=5, validator=positive)
    hot_question_days: float = attrs.field(default=7.0, validator=positive)


@attrs.frozen
class LocationSettings:
    # Per-user minimum interval between accepted update_location requests.
    min_update_interval_s: float = attrs.field(default=2.0, validator=attrs.validators.ge(0))
    # Live positions are kept to about this precision (metres).
    precision_m: float = attrs.field(default=100.0, validator=positive)
    nearby_radius_m: float = attrs.field(default=3000.0, validator=positive)
    nearby_max: int = attrs.field(default=5, validator=positive)
    nearby_max_age_s: float = attrs.field(default=3600.0, validator=positive)
    # The service area's UTC offset, for quiet hours (Korea: +9 h).
    utc_offset_minutes: int = attrs.field(default=540, validator=[attrs.validators.ge(-720), attrs.validators.le(840)])
    hotspot_window_s: float = attrs.field(default=900.0, validator=positive)
    hotspot_cell_m: float = attrs.field(default=500.0, validator=positive)
    # A GeoJSON FeatureCollection of service regions; empty: the bundled Jeju set.
    regions_file: str = ""


@attrs.frozen
class AlertSettings:
    # A question still unanswered this long after it was asked raises
    # slow_response_alert (the promise: a first answer within 10 minutes).
    slow_response_s: float = attrs.field(default=600.0, validator=positive)
    # Alerts are also POSTed here as JSON (empty: admins' inboxes only).
    webhook_url: str = ""
    # Answer-time SLOs cover the questions of the last this many days.
    slo_window_days: float = attrs.field(default=7.0, validator=positive)


@attrs.frozen
class LimitSettings:
    # Every request of one connection (including malformed frames).
    conn_per_s: float = attrs.field(default=20.0, validator=positive)
    conn_burst: float = attrs.field(default=40.0, validator=positive)
    # Per user, across connections: answers, accepts, closes, receipts, settings.
    writes_per_minute: float = attrs.field(default=30.0, validator=positive)
    writes_burst: float = attrs.field(default=10.0, validator=positive)
    questions_per_hour: float = attrs.field(default=20.0, validator=positive)
    questions_burst: float = attrs.field(default=5.0, validator=positive)
    typing_per_s: float = attrs.field(default=2.0, validator=positive)
    typing_burst: float = attrs.field(default=5.0, validator=positive)
    # Per user: the read operations (get_question, my_questions, browse, ...).
    reads_per_s: float = attrs.field(default=5.0, validator=positive)
    reads_burst: float = attrs.field(default=30.0, validator=positive)
    # Refusals within a minute after which the connection is closed with 4008.
    abuse_refusals_per_minute: int = attrs.field(default=30, validator=positive)
    # Per client address (the real one behind trusted proxies; see
    # dongne.core.admission): WebSocket handshakes per minute, loose, since
    # thousands of users may share one address behind a carrier's NAT ...
    connections_per_ip_per_minute: float = attrs.field(default=3000.0, validator=positive)
    # ... and strictly, handshakes that fail (bad token, no hello, a bad
    # first frame, a malformed upgrade, a flood of bad frames) per minute,
    # beyond which the address gets HTTP 429 until it has waited ...
    failed_handshakes_per_ip_per_minute: float = attrs.field(default=60.0, validator=positive)
    # ... and handshakes of one address in flight that have not authenticated yet.
    unauthenticated_per_ip: int = attrs.field(default=256, validator=positive)
    ip_blocklist: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_networks)
    rooms_per_connection: int = attrs.field(default=50, validator=positive)
    connections_per_user: int = attrs.field(default=10, validator=positive)


@attrs.frozen
class ContentSettings:
    # Regular expressions (case-insensitive); matching text is refused with "spam".
    spam_patterns: tuple[str, ...] = attrs.field(default=DEFAULT_SPAM_PATTERNS, converter=tuple, validator=_patterns)


@attrs.frozen
class QuestionSettings:
    # An open question without an accepted answer expires this long after it
    # was asked: its escalation stops and it leaves memory (still readable).
    ttl_s: float = attrs.field(default=86_400.0, validator=positive_or_inf)


@attrs.frozen
class ModerationSettings:
    # This many distinct users reporting one item hide it at once, pending review.
    auto_hide_reports: int = attrs.field(default=3, validator=positive)
    # Per user: report_content requests.
    reports_per_hour: float = attrs.field(default=20.0, validator=positive)
    reports_burst: float = attrs.field(default=5.0, validator=positive)


@attrs.frozen
class CoreSettings:
    """Everything the engine is configured with, in one value.

    Attributes:
        stages: the escalation plan.
        alerts_per_batch: a stage is planned at once; its alerts are
            committed and sent this many at a time.
        hello_timeout_s: a connection that has not sent ``hello`` this long
            after it opened is closed with 4001.
    """

    engine: EngineSettings = EngineSettings()
    location: LocationSettings = LocationSettings()
    limits: LimitSettings = LimitSettings()
    content: ContentSettings = ContentSettings()
    alerts: AlertSettings = AlertSettings()
    questions: QuestionSettings = QuestionSettings()
    moderation: ModerationSettings = ModerationSettings()
    stages: tuple[StagePlan, ...] = attrs.field(default=DEFAULT_STAGES, converter=stages_from_config)
    alerts_per_batch: int = attrs.field(default=100, validator=positive)
    hello_timeout_s: float = attrs.field(default=10.0, validator=positive_or_inf)
