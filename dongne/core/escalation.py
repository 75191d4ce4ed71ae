"""The escalation planner: who gets notified at each stage of a question.

Theory of operation
-------------------

A question escalates through a fixed plan of stages (:data:`DEFAULT_STAGES`,
or one read from configuration by :func:`stages_from_config`). The engine
owns the timers; when a stage is due it calls :func:`plan_stage`, a pure
function of the question, the locals directory, who is online, who was
already notified, the :class:`AlertLedger` and an explicit ``now_ms``. It
returns the :class:`Target` list to notify, in a deterministic order, and
changes nothing: the caller adds the targets to the question's notified set
and calls :meth:`AlertLedger.record` once it commits to sending.

Default stages::

    name       offset  audience        radius  limit  extra
    immediate    0 s   online_nearby    2 km     10   immediate alerts on, priority high
    quick        3 s   nearby           5 km      -   online by live, offline by home position
    extended    30 s   experts          -         -   expertise tags meet the question's hashtags
    final      120 s   everyone         -         -   only while the question has no answer

Eligibility (every stage): the user is a verified local (a key of
``locals``), is not the asker, has not been notified for this question, and
is under their hourly cap. Then, per user setting:

* *Immediate alerts off* skips the user in stages with
  ``requires_immediate_alerts`` (the default ``immediate`` stage only); they
  stay eligible for every later stage.
* *Quiet hours* ``(start, end)`` skip the user while the local hour ``h``
  (in the region's UTC offset, +9 h for Korea) satisfies ``start <= h <
  end``, or, for a window wrapping midnight (``start > end``), ``h >= start
  or h < end``. **Urgent questions break through quiet hours**: a question
  marked urgent is the asker saying it cannot wait until morning (lost child,
  medical, stranded), and the priority ``critical`` tells the client why it
  rang at night. Urgency does *not* override the other two settings: turning
  immediate alerts off and the hourly cap are hard limits the user chose.
* *The hourly cap* ``max_alerts_per_hour`` counts the user's alerts over a
  sliding 60-minute window across all questions (:class:`AlertLedger`). A
  capped user is skipped and the next candidate in order takes the place,
  so a limited stage still fills up to its limit when enough people exist.
  A stage may use only a share of each cap (``cap_share``): in the default
  plan the wider stages stop at 75% of it (15 of the default 20), keeping
  the rest for IMMEDIATE alerts. Without that, a busy hour of QUICK alerts
  about questions 5 km away used up the caps of exactly the locals a
  question asked next to them needs most.

Priorities, sounds and vibrations (exactly):

=========================  ============  ==========  ===========
case                       ``priority``  ``sound``   ``vibration``
=========================  ============  ==========  ===========
urgent question, any stage ``critical``  ``urgent``  ``strong``
normal question, stage     ``high``      ``urgent``  ``strong``
with ``priority="high"``
(the ``immediate`` stage)
normal question, any other ``normal``    ``normal``  ``light``
stage
=========================  ============  ==========  ===========

``low`` (:data:`PRIORITY_LOW`) is reserved for system notices and is never
produced by the planner.

Complexity: ``online_nearby`` stages never scan the directory; they ask
``live.nearest_within`` for ``k`` users and, when some are skipped, ask
again with a larger ``k`` (doubling at least), so the cost is
``O(log n + skipped)`` tree work plus a few queries. ``nearby`` stages use
``live.within`` for online locals and, for offline ones, either an optional
``homes`` index or a scan of the directory (``O(locals)``, fine for Jeju's
tens of thousands). ``experts`` and ``everyone`` scan the directory:
``O(locals)`` plus a sort of the chosen.
"""

from __future__ import annotations

from .directory import LocalInfo, NotificationSettings, QuestionBrief, Target
from .ledger import AlertLedger, AlertLedgerStatistics
from .planner import in_quiet_hours, plan_stage
from .stages import (
    AUDIENCES,
    DEFAULT_STAGES,
    KST_UTC_OFFSET_MINUTES,
    MAX_ALERTS_PER_HOUR_LIMIT,
    PRIORITY_CRITICAL,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NORMAL,
    Audience,
    StagePlan,
    stages_from_config,
)

__all__ = [
    "AUDIENCES",
    "DEFAULT_STAGES",
    "KST_UTC_OFFSET_MINUTES",
    "MAX_ALERTS_PER_HOUR_LIMIT",
    "PRIORITY_CRITICAL",
    "PRIORITY_HIGH",
    "PRIORITY_LOW",
    "PRIORITY_NORMAL",
    "AlertLedger",
    "AlertLedgerStatistics",
    "Audience",
    "LocalInfo",
    "NotificationSettings",
    "QuestionBrief",
    "StagePlan",
    "Target",
    "in_quiet_hours",
    "plan_stage",
    "stages_from_config",
]
