"""Escalation plans: stages, their audiences and priorities, and the default plan."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, get_args

import attrs

from .errors import ConfigError

Audience = Literal["online_nearby", "nearby", "experts", "everyone"]
#: Every audience a stage may name.
AUDIENCES: Final[tuple[str, ...]] = get_args(Audience)
StagePriority = Literal["high", "normal"]
_STAGE_PRIORITIES: Final[tuple[str, ...]] = get_args(StagePriority)

PRIORITY_CRITICAL: Final = "critical"
PRIORITY_HIGH: Final = "high"
PRIORITY_NORMAL: Final = "normal"
#: Reserved for system notices; the planner never produces it.
PRIORITY_LOW: Final = "low"

#: Korea Standard Time, UTC+9, the default region offset for quiet hours.
KST_UTC_OFFSET_MINUTES: Final = 540
#: Upper bound of ``max_alerts_per_hour``; also how many alert times the
#: ledger keeps per user, so its counts are exact for every valid cap.
MAX_ALERTS_PER_HOUR_LIMIT: Final = 1000

_HOUR_MS: Final = 3_600_000
_URGENCIES: Final = ("normal", "urgent")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalize_tag(tag: str) -> str:
    # Same normalization as the wire (protocol.hashtags) and tokens (auth).
    return tag.strip().lstrip("#").lower()


# ---------------------------------------------------------------------------
# Stage plans
# ---------------------------------------------------------------------------


def _check_stage(stage: StagePlan) -> None:
    """Raise :class:`ConfigError` if one stage is inconsistent on its own."""
    where = f"escalation stage {stage.name!r}"
    if not isinstance(stage.name, str) or not stage.name:
        raise ConfigError(f"escalation stage name must be a non-empty string, got {stage.name!r}")
    if not _is_number(stage.offset_s) or not (math.isfinite(stage.offset_s) and stage.offset_s >= 0):
        raise ConfigError(f"{where}: offset_s must be a finite number >= 0, got {stage.offset_s!r}")
    if stage.audience not in AUDIENCES:
        raise ConfigError(f"{where}: audience must be one of {', '.join(AUDIENCES)}; got {stage.audience!r}")
    if stage.audience in ("online_nearby", "nearby"):
        if stage.radius_m is None:
            raise ConfigError(f"{where}: audience {stage.audience!r} needs radius_m")
        if not _is_number(stage.radius_m) or not (math.isfinite(stage.radius_m) and stage.radius_m > 0):
            raise ConfigError(f"{where}: radius_m must be a finite number > 0, got {stage.radius_m!r}")
    elif stage.radius_m is not None:
        raise ConfigError(f"{where}: audience {stage.audience!r} takes no radius_m (it is not by distance)")
    if stage.limit is not None and (
        not isinstance(stage.limit, int) or isinstance(stage.limit, bool) or stage.limit < 1
    ):
        raise ConfigError(f"{where}: limit must be null or an integer >= 1, got {stage.limit!r}")
    for flag in ("requires_immediate_alerts", "only_if_unanswered"):
        if not isinstance(getattr(stage, flag), bool):
            raise ConfigError(f"{where}: {flag} must be true or false, got {getattr(stage, flag)!r}")
    if stage.priority not in _STAGE_PRIORITIES:
        raise ConfigError(f"{where}: priority must be 'high' or 'normal', got {stage.priority!r}")
    if not _is_number(stage.cap_share) or not (0 < stage.cap_share <= 1):
        raise ConfigError(f"{where}: cap_share must be a number > 0 and <= 1, got {stage.cap_share!r}")


@attrs.frozen
class StagePlan:
    """One stage of the escalation plan.

    Attributes:
        name: Unique stage name, carried by every :class:`Target`.
        offset_s: Seconds after the question was asked when the stage runs.
        radius_m: For ``online_nearby`` and ``nearby``, the inclusive
            great-circle radius around the question; ``None`` (required) for
            ``experts`` and ``everyone``.
        limit: At most this many targets (nearest first); ``None`` for all.
        audience: ``online_nearby``: online locals by live position;
            ``nearby``: online locals by live position plus offline locals
            by home position; ``experts``: locals whose expertise tags meet
            the question's hashtags, anywhere; ``everyone``: all locals.
        requires_immediate_alerts: Skip users who turned immediate alerts off.
        only_if_unanswered: Plan nobody once the question has an answer.
        priority: ``high`` makes the stage loud (priority ``high``, sound
            ``urgent``, vibration ``strong``) for normal questions; urgent
            questions are ``critical`` in every stage regardless.
        cap_share: The share of each user's hourly cap this stage may fill
            (``0 < cap_share <= 1``): a user is eligible while their alerts of
            the last hour are under ``max(1, floor(cap * cap_share))`` (none
            for a cap of 0).

    Raises:
        ConfigError: (a ``ValueError``) if the fields are inconsistent.
    """

    name: str
    offset_s: float
    radius_m: float | None
    limit: int | None
    audience: Audience
    requires_immediate_alerts: bool = False
    only_if_unanswered: bool = False
    priority: StagePriority = "normal"
    cap_share: float = 1.0

    def __attrs_post_init__(self) -> None:
        _check_stage(self)

    def cap_for(self, max_alerts_per_hour: int) -> int:
        """How many alerts of the last hour a user with this cap may have had and still be alerted here."""
        if max_alerts_per_hour <= 0:
            return 0  # the user wants no alerts
        return max(1, math.floor(max_alerts_per_hour * self.cap_share))


#: The product's default plan; see the module docstring.
DEFAULT_STAGES: Final[tuple[StagePlan, ...]] = (
    StagePlan("IMMEDIATE", 0.0, 2_000.0, 10, "online_nearby", requires_immediate_alerts=True, priority="high"),
    StagePlan("QUICK", 3.0, 5_000.0, None, "nearby", cap_share=0.75),
    StagePlan("EXTENDED", 30.0, None, None, "experts", cap_share=0.75),
    StagePlan("FINAL", 120.0, None, None, "everyone", only_if_unanswered=True, cap_share=0.75),
)

_STAGE_KEYS: Final = (
    "name",
    "offset_s",
    "radius_m",
    "limit",
    "audience",
    "requires_immediate_alerts",
    "only_if_unanswered",
    "priority",
    "cap_share",
)


def stages_from_config(config: Sequence[Mapping[str, Any] | StagePlan]) -> tuple[StagePlan, ...]:
    """Build and validate an escalation plan from configuration.

    Each item is a mapping with keys ``name``, ``offset_s``, ``audience``
    (required) and ``radius_m``, ``limit`` (default ``None``),
    ``requires_immediate_alerts``, ``only_if_unanswered`` (default
    ``False``), ``priority`` (default ``"normal"``) and ``cap_share``
    (default 1.0); the meaning of each
    is in :class:`StagePlan`.

    Args:
        config: The stages, in order.

    Returns:
        The stages as a tuple of :class:`StagePlan`.

    Raises:
        ConfigError: (a ``ValueError``) naming the stage and the field if the
            list is empty, an item is not a mapping, a key is unknown or
            missing, a value is invalid, two stages share a name, or offsets
            decrease.
    """
    if isinstance(config, (str, bytes)) or not isinstance(config, Sequence):
        raise ConfigError("escalation stages must be a list of stage objects")
    if not config:
        raise ConfigError("escalation stages must not be empty")
    stages: list[StagePlan] = []
    for i, item in enumerate(config, start=1):
        if isinstance(item, StagePlan):
            stages.append(_in_order(i, item, stages))  # its fields were checked when it was made
            continue
        if not isinstance(item, Mapping):
            raise ConfigError(f"escalation stage {i} must be an object, got {type(item).__name__}")
        unknown = sorted(str(key) for key in item if key not in _STAGE_KEYS)
        if unknown:
            raise ConfigError(f"escalation stage {i}: unknown key(s) {', '.join(unknown)}")
        for key in ("name", "offset_s", "audience"):
            if key not in item:
                raise ConfigError(f"escalation stage {i}: missing required key {key!r}")
        try:
            stage = StagePlan(
                name=item["name"],
                offset_s=item["offset_s"],
                radius_m=item.get("radius_m"),
                limit=item.get("limit"),
                audience=item["audience"],
                requires_immediate_alerts=item.get("requires_immediate_alerts", False),
                only_if_unanswered=item.get("only_if_unanswered", False),
                priority=item.get("priority", "normal"),
                cap_share=item.get("cap_share", 1.0),
            )
        except ConfigError as exc:
            raise ConfigError(f"escalation stage {i}: {exc}") from None
        stages.append(_in_order(i, stage, stages))
    return tuple(stages)


def _in_order(i: int, stage: StagePlan, before: list[StagePlan]) -> StagePlan:
    """``stage``, if its name is new and its offset not before the previous stage's."""
    if any(s.name == stage.name for s in before):
        raise ConfigError(f"escalation stage {i}: duplicate stage name {stage.name!r}")
    if before and stage.offset_s < before[-1].offset_s:
        raise ConfigError(
            f"escalation stage {i} ({stage.name!r}): offset_s {stage.offset_s!r} is before the"
            f" previous stage's {before[-1].offset_s!r}; offsets must not decrease"
        )
    return stage
