"""The heartbeat: ping each quiet connection once an interval; drop one that stopped answering."""

from __future__ import annotations

import heapq
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
    """Ping each quiet connection once per ``interval`` (s); drop one that sent nothing a whole interval after its ping.

    A connection that sent a message in the last half interval is not
    pinged: its messages show it is there, and the replies to them keep
    proxies between us busy both ways. A pong is not a message, so a quiet
    connection that answers is pinged every round. One that goes silent is
    pinged at its first turn at least half an interval after its last
    message, and dropped a whole interval after that ping if nothing came
    back: about 2.5 intervals after its last message.

    The round is spread over the interval in slices ``HEARTBEAT_SLICE_S``
    apart: 10,000 pings written in one go (and their 10,000 pongs coming
    back together) stalled everything else for a few hundred ms. A
    connection's turn in the round moves when others come or go, so pings
    are judged from a heap of their due times, checked at every slice, not
    at their connections' next turns (which may come too early, or late).
    """
    if math.isinf(interval):
        await trio.sleep_forever()
    slices = max(1, int(interval / HEARTBEAT_SLICE_S))
    # (when to judge, conn id, when pinged, conn) of each ping sent, in order of when to judge it.
    pings: list[tuple[float, int, float, WebSocketConnection]] = []
    next_round = trio.current_time() + interval
    while True:
        await trio.sleep_until(next_round)
        round_start, next_round = next_round, next_round + interval
        round_conns = list(conns.items())
        per_slice = max(1, -(-len(round_conns) // slices))
        for i in range(0, len(round_conns), per_slice):
            await trio.sleep_until(round_start + interval * (i // per_slice) / slices)
            now = trio.current_time()
            while pings and pings[0][0] <= now:
                _, conn_id, pinged_at, conn = heapq.heappop(pings)
                if conns.get(conn_id) is conn and conn.ping_sent_at == pinged_at and not conn.alive:
                    log.info("connection_dead", extra={"reason": "no answer to ping"})
                    conn.abort()
            for conn_id, conn in round_conns[i : i + per_slice]:
                if conns.get(conn_id) is not conn or conn.socket_closed:
                    continue  # gone meanwhile
                if conn.ping_sent_at is not None and not conn.alive:
                    continue  # its ping is judged a whole interval after it was sent (above)
                if now - conn.last_message_at < interval / 2:
                    conn.ping_sent_at = None
                    continue
                conn.alive = False
                conn.ping_sent_at = now
                heapq.heappush(pings, (now + interval, conn_id, now, conn))
                conn.ping()
