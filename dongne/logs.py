"""Logging: one JSON object per line (python-json-logger), or plain text.

Each record has ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``event``,
plus the fields passed in ``extra`` (``conn``, ``user``, ``question_id``,
``duration_ms``, ...). The text of questions and answers is never logged at
info level: events carry ids, regions and counts only.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

__all__ = ["configure_logging"]


def configure_logging(level: str, fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send the ``dongne`` loggers (and hypercorn's) to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger", "message": "event"},
                timestamp="time",
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
