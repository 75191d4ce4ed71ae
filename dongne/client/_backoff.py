"""Reconnection delays: exponential backoff with full jitter."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator

import attrs


@attrs.frozen
class Backoff:
    """When to try connecting again: exponential backoff with full jitter.

    Attempt ``n`` (1-based) waits ``min(cap, base * factor ** (n - 1)) * jitter()``
    seconds, ``jitter()`` being uniform in [0, 1): spread out, so that clients
    dropped together (a server restart closes everyone with 1001) do not come
    back together. With the defaults: up to 1, 2, 4, 8, 16 s, then give up.

    Args:
        base: the ceiling of the first wait, in seconds.
        factor: how much the ceiling grows per attempt.
        cap: the largest ceiling.
        max_attempts: attempts in a row before giving up; ``None``: never give up.
    """

    base: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    factor: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    cap: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    max_attempts: int | None = 5

    def __attrs_post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError(f"max_attempts must be None or >= 0, not {self.max_attempts}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before attempt ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempts count from 1, not {attempt}")
        try:
            grown = self.base * self.factor ** (attempt - 1)
        except OverflowError:  # unlimited attempts: factor ** n leaves the floats
            grown = math.inf
        return min(self.cap, grown)

    def delay(self, attempt: int, jitter: Callable[[], float] | None = random.random) -> float:
        """The wait before attempt ``attempt``; ``jitter=None`` gives the ceiling itself."""
        ceiling = self.ceiling(attempt)
        return ceiling if jitter is None else ceiling * jitter()

    def delays(self, jitter: Callable[[], float] | None = random.random) -> Iterator[float]:
        """The whole schedule: one wait per allowed attempt (endless if unlimited)."""
        attempts = itertools.count(1) if self.max_attempts is None else range(1, self.max_attempts + 1)
        for attempt in attempts:
            yield self.delay(attempt, jitter)

    def gives_up_after(self, failed: int) -> bool:
        """Whether ``failed`` failed attempts in a row are too many."""
        return self.max_attempts is not None and failed >= self.max_attempts
