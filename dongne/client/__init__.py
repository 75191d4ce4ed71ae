"""A Python client for dongne, on trio-websocket.

``open_client`` is one connection; ``open_session`` one that comes back (it
reconnects with backoff, resumes durable events and re-joins rooms)::

    async with open_session("ws://127.0.0.1:8765", get_token) as session:
        reply = await session.request("create_question", {...})
        event = await session.next_event("answer_notification")

Every request gets an integer id; ``request`` waits for the matching reply and
raises ``RequestError`` (with the wire ``code``) when it is an error. Server
events are queued for ``next_event`` / ``pending_events``. Both track
``last_seq`` and drop a durable event they have already seen.

``pages`` walks a paged list (``my_questions``, ``browse_questions``,
``list_notifications``, ...) page by page::

    async for page in pages(session, "my_questions", {"status": "open"}):
        ...

Theory of operation (sessions): one driver task owns the connection. It
connects, says ``hello`` (with ``resume.last_seq`` = the last durable seq the
session queued), re-joins the rooms the session is in and re-sends its last
location, and only then reports ``CONNECTED`` and lets requests through. Events
of every connection go to one queue owned by the session, so nothing queued is
lost with a connection; a durable event at or below ``last_seq`` is a replay
overlap and dropped, one past a gap makes the session reconnect and resume
(the replay fills the gap), so the queue holds each seq once, in order.
Rooms and the location are tracked from replies as the reader dispatches them,
before any later frame, so a reconnect never misses a join it has seen
acknowledged. A request in flight when the connection drops fails with
``ConnectionLost``: it may or may not have been applied, and only the caller
knows whether it is safe to send again.
"""

from ._backoff import Backoff as Backoff
from ._connection import DongneClient as DongneClient
from ._connection import open_client as open_client
from ._errors import (
    AuthenticationFailed as AuthenticationFailed,
)
from ._errors import (
    ConnectFailed as ConnectFailed,
)
from ._errors import (
    ConnectionLost as ConnectionLost,
)
from ._errors import (
    RequestError as RequestError,
)
from ._errors import (
    SessionClosed as SessionClosed,
)
from ._errors import (
    SessionError as SessionError,
)
from ._pages import PAGING as PAGING
from ._pages import Requester as Requester
from ._pages import pages as pages
from ._session import (
    Session as Session,
)
from ._session import (
    SessionState as SessionState,
)
from ._session import (
    SessionStatistics as SessionStatistics,
)
from ._session import (
    TokenSource as TokenSource,
)
from ._session import (
    open_session as open_session,
)

__all__ = [
    "PAGING", "AuthenticationFailed", "Backoff", "ConnectFailed", "ConnectionLost", "DongneClient", "RequestError",
    "Requester", "Session", "SessionClosed", "SessionError", "SessionState", "SessionStatistics", "TokenSource",
    "open_client", "open_session", "pages",
]  # fmt: skip
