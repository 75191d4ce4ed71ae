"""dongne's sans-I/O core: every rule, no sockets, no files, no clock.

The driver (``dongne.server``) feeds ``Engine.handle`` small frozen events
with an explicit ``now`` and acts on the ``Outcome`` it returns: commit its
writes, then perform its actions. Nothing in this package imports trio or
anything of dongne's outside it.
"""

from .effects import (
    Action,
    AppendEvent,
    CancelEscalation,
    Close,
    EnqueuePush,
    Note,
    Observe,
    Outcome,
    Push,
    Replay,
    SaveAnswer,
    SaveEscalation,
    SaveNotified,
    SavePushStatus,
    SaveQuestion,
    SaveUser,
    Send,
    StartEscalation,
    Write,
    rows_of,
)
from .engine import Engine, LoadedState, TokenCheck
from .errors import CloseConnection, ConfigError, DongneError, ProtocolError
from .escalation import DEFAULT_STAGES, StagePlan, stages_from_config
from .events import (
    Connected,
    Disconnected,
    EscalationDue,
    Event,
    FrameReceived,
    QuestionLoaded,
    Reloaded,
    Tick,
    WritesFailing,
    WritesWork,
)
from .records import Answer, Claims, PushJob, Question, User
from .regions import Hotspot, RegionSet, load_default_regions, load_hotspots
from .settings import (
    AlertSettings,
    ContentSettings,
    CoreSettings,
    EngineSettings,
    LimitSettings,
    LocationSettings,
)

__all__ = [
    "DEFAULT_STAGES",
    "Action",
    "AlertSettings",
    "Answer",
    "AppendEvent",
    "CancelEscalation",
    "Claims",
    "Close",
    "CloseConnection",
    "ConfigError",
    "Connected",
    "ContentSettings",
    "CoreSettings",
    "Disconnected",
    "DongneError",
    "Engine",
    "EngineSettings",
    "EnqueuePush",
    "EscalationDue",
    "Event",
    "FrameReceived",
    "Hotspot",
    "LimitSettings",
    "LoadedState",
    "LocationSettings",
    "Note",
    "Observe",
    "Outcome",
    "ProtocolError",
    "Push",
    "PushJob",
    "Question",
    "QuestionLoaded",
    "RegionSet",
    "Reloaded",
    "Replay",
    "SaveAnswer",
    "SaveEscalation",
    "SaveNotified",
    "SavePushStatus",
    "SaveQuestion",
    "SaveUser",
    "Send",
    "StagePlan",
    "StartEscalation",
    "Tick",
    "TokenCheck",
    "User",
    "Write",
    "WritesFailing",
    "WritesWork",
    "load_default_regions",
    "load_hotspots",
    "rows_of",
    "stages_from_config",
]
