"""The heartbeat: ping every connection once an interval; drop one that stopped answering."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import trio

from .transport import WebSocketConnection

__all__ = ["HEARTBEAT_SLICE_S", "keep_alive"]

log = logging.getLogger("dongne.server")

#: The heartbeat pings a share of the connections this often (see ``keep_alive``).
HEARTBEAT_SLICE_S = 0.1


async def keep_alive(conns: Mapping[int, WebSocketConnection], interval: float) -> None:
    """Ping every connection once per ``interval`` (s); drop one that sent nothing since its last ping.

    The round is spread over the interval in slices ``HEARTBEAT_SLICE_S``
    apart: 10,000 pings written in one go (and their 10,000 pongs coming
    back together) stalled everything else for a few hundred ms.
    """
    if math.isinf(interval):
        await trio.sleep_forever()
    slices = max(1, int(interval / HEARTBEAT_SLICE_S))
    next_round = trio.current_time() + interval
    while True:
        await trio.sleep_until(next_round)
        round_start, next_round = next_round, next_round + interval
        round_conns = list(conns.items())
        per_slice = max(1, -(-len(round_conns) // slices))
        for i in range(0, len(round_conns), per_slice):
            await trio.sleep_until(round_start + interval * (i // per_slice) / slices)
            for conn_id, conn in round_conns[i : i + per_slice]:
                if conns.get(conn_id) is not conn:
                    continue  # gone meanwhile
                if not conn.alive:
                    log.info("connection_dead", extra={"reason": "no answer to ping"})
                    conn.abort()
                    continue
                conn.alive = False
                conn.ping()
