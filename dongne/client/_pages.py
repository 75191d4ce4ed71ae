"""Paging through the read operations' lists: ``pages``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

__all__ = ["PAGING", "Requester", "pages"]


class Requester(Protocol):
    """Anything with ``request`` as ``DongneClient`` and ``Session`` have it."""

    async def request(
        self, op: str, data: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]: ...


#: Each paged operation's request field for the position and the reply field
#: that holds the next one (PROTOCOL.md, "Reading: pages and lists"); any other
#: operation pages by ``before`` / ``next``.
PAGING: Mapping[str, tuple[str, str]] = {
    "get_question": ("answers_after", "next"),
    "my_questions": ("before", "next"),
    "my_answers": ("before", "next"),
    "browse_questions": ("before", "next"),
    "list_notifications": ("before_seq", "next_before_seq"),
}


async def pages(
    client: Requester,
    op: str,
    data: Mapping[str, Any] | None = None,
    *,
    cursor_field: str | None = None,
    next_field: str | None = None,
    max_pages: int | None = None,
    timeout: float | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the reply of each page of a list, first to last.

    ::

        async for page in pages(client, "my_questions", {"status": "open"}):
            show(page["questions"])
        async for page in pages(session, "list_notifications", {"limit": 50}):
            show(page["notifications"])

    Each request is ``data`` plus the position the previous reply handed out
    (its ``next_field``, sent back as ``cursor_field``); the last page is the
    one whose ``next_field`` is ``None`` or missing. Cursors are opaque: they
    go back exactly as they came.

    Args:
        client: a ``DongneClient`` or a ``Session`` (a session carries on across
            reconnects: a cursor outlives its connection).
        op: a paged operation (``my_questions``, ``my_answers``,
            ``browse_questions``, ``get_question``, ``list_notifications``).
        data: the request's other fields (``limit``, filters); not modified.
        cursor_field, next_field: the request field for the position and the
            reply field for the next one; by default from ``PAGING``
            (``before`` / ``next``; ``answers_after`` / ``next`` for
            ``get_question``; ``before_seq`` / ``next_before_seq`` for
            ``list_notifications``).
        max_pages: stop after this many pages (``None``: until the last).
        timeout: for each request (default: the client's).

    Raises:
        RequestError: a page was refused (``invalid_field`` for a cursor the
            server does not take, ``rate_limited`` when pages are asked too
            fast: reads have their own limit).
        ValueError: the server handed out the position it was just given
            again (paging would never end).

    Resource handling: nothing is held between pages; breaking out of the
    loop stops it.
    """
    default_cursor, default_next = PAGING.get(op, ("before", "next"))
    cursor_field = cursor_field or default_cursor
    next_field = next_field or default_next
    request = dict(data or {})
    count = 0
    while max_pages is None or count < max_pages:
        page = await client.request(op, request, timeout=timeout)
        count += 1
        yield page
        position = page.get(next_field)
        if position is None:
            return
        if position == request.get(cursor_field):
            raise ValueError(f"{op}: the server returned the same {next_field!r} again: {position!r}")
        request[cursor_field] = position
