"""Engine replica of bench/escalation.py: the same load on the sans-I/O engine, in one process, simulated time.

    python bench/escalation_engine.py [--questions 1500] [--locals 10000] [--step-m 0] [--seed 1]
                                      [--profile out.prof]

No sockets, no SQLite, no trio: the engine (``dongne.core.Engine``) is fed
what ``bench/escalation.py``'s clients send, on an explicit clock, and each
outcome's frames and rows are encoded as the driver and the store would
(``FrameEncoder.binary`` over the msgpack, ``prepare_writes``), without
sending or committing them. So it measures the Python the server runs per
question (planning, alerts, moves, encoding) without the kernel, SQLite or
the machine's other work: CPU time of a deterministic workload, steady
enough to compare two trees on a busy machine (run it with
``PYTHONPATH=<tree>`` for each, alternating).

The load: ``--locals`` verified locals around the 30 bundled hotspots
(within 2 km), 300 askers; question *k* at 20 ms * k (50/s) within 1 km of a
random hotspot; 10 moves per question by 30% of the locals, round-robin (a
jump to a random point around their hotspot, or ``--step-m`` metres from
where they were); every escalation stage run when due, in batches, as the
driver does (a heap of due times, like the driver's timers: only questions
with a stage due are looked at). Prints CPU seconds, CPU ms per question,
frames, rows and young collections.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import math
import random
import time
from typing import Any

import msgpack

from dongne.core import (
    Claims,
    Connected,
    CoreSettings,
    Engine,
    EscalationDue,
    FrameReceived,
    LimitSettings,
    Outcome,
    effects,
)
from dongne.core.effects import Send
from dongne.core.geo import offset_position
from dongne.core.regions import load_default_regions, load_hotspots
from dongne.core.settings import LocationSettings
from dongne.store._writes import prepare_writes
from dongne.transport import FrameEncoder

#: A stage's alerts as one action (absent from older trees, which this bench also measures).
SendEach = getattr(effects, "SendEach", None)

T0 = 1_800_000_000_000
HASHTAGS = ["food", "beach", "hiking", "cafe", "blackpork", "bus", "weather", "sunrise", "olle", "market"]


def _claims(token: object, now_s: float) -> Claims:
    user = str(token)
    return Claims(user_id=user, nick=user, local=user.startswith("L"), tags=(), role="user")


class Replica:
    """The engine and what the driver and the store would do with its outcomes, minus the I/O."""

    def __init__(self, seed: int) -> None:
        self.regions = load_default_regions()
        self.hotspots = load_hotspots()
        self.rng = random.Random(seed)
        limits = LimitSettings(
            questions_burst=10**6,
            writes_burst=10**6,
            conn_burst=10**6,
            questions_per_hour=10**9,
            writes_per_minute=10**9,
            conn_per_s=10**6,
        )
        ids = itertools.count(1)
        self.engine = Engine(
            CoreSettings(location=LocationSettings(min_update_interval_s=1.0), limits=limits),
            _claims,
            region_of=self.regions.region_of,
            new_id=lambda prefix, now: f"{prefix}{next(ids)}",
        )
        self.encoder = FrameEncoder()
        self.rids = itertools.count(1)
        self.frames = 0
        self.rows = 0

    def around(self, spot: int, radius_m: float) -> tuple[float, float]:
        hs = self.hotspots[spot]
        while True:
            r = radius_m * math.sqrt(self.rng.random())
            theta = self.rng.random() * 2 * math.pi
            lat, lng = offset_position(hs.lat, hs.lng, r * math.cos(theta), r * math.sin(theta))
            if self.regions.region_of(lat, lng) is not None:
                return round(lat, 6), round(lng, 6)

    def drive(self, outcome: Outcome) -> Outcome:
        for action in outcome.actions:
            if isinstance(action, Send):
                # getattr: trees from before or after Send.packed can be measured too.
                self.encoder.binary(getattr(action, "packed", b"") or msgpack.packb(action.frame))
                self.frames += len(action.conn_ids)
            elif SendEach is not None and isinstance(action, SendEach):
                for conn_ids, _seq, packed in action.frames:
                    self.encoder.binary(packed)
                    self.frames += len(conn_ids)
        if outcome.writes:
            prepare_writes(list(outcome.writes), 32766)
            self.rows += len(outcome.writes)
        return outcome

    def call(self, conn_id: int, op: str, data: dict[str, Any], now: int) -> Outcome:
        frame = msgpack.packb({"type": op, "id": next(self.rids), "data": data})
        return self.drive(self.engine.handle(FrameReceived(conn_id, frame), now))

    def run_due(self, question_id: str, now: int) -> int | None:
        """Run what is due of a question's escalation at ``now``; return when it is next due (None: done)."""
        while (due := self.engine.escalation_due(question_id)) is not None and due <= now:
            self.drive(self.engine.handle(EscalationDue(question_id), now))
        return due


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=1500)
    p.add_argument("--locals", type=int, default=10000)
    p.add_argument("--step-m", type=float, default=0.0, help="movers walk this far per move (default 0: they jump)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", help="write a cProfile of the measured part here")
    args = p.parse_args()

    r = Replica(args.seed)
    positions: dict[int, tuple[float, float]] = {}
    for i in range(args.locals):
        r.engine.handle(Connected(1000 + i), T0)
        r.call(1000 + i, "hello", {"token": f"L{i}"}, T0)
        positions[i] = r.around(i % 30, 2000.0)
        r.call(1000 + i, "update_location", {"location": dict(zip(("lat", "lng"), positions[i], strict=True))}, T0)
    askers = 300
    for a in range(askers):
        r.engine.handle(Connected(a + 1), T0)
        r.call(a + 1, "hello", {"token": f"A{a}"}, T0)
    movers = list(range(int(args.locals * 0.3)))
    r.rng.shuffle(movers)
    next_mover = itertools.cycle(movers)
    gc.collect()
    gc.freeze()
    young0 = gc.get_stats()[0]["collections"]
    frames0 = r.frames
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    cpu0 = time.process_time()
    start = T0 + 10_000
    # (due, question_id): the driver's timers, so only questions with a stage due are looked at.
    timers: list[tuple[int, str]] = []

    def run_timers(now: int) -> None:
        while timers and timers[0][0] <= now:
            _, question_id = heapq.heappop(timers)
            due = r.run_due(question_id, now)
            if due is not None:
                heapq.heappush(timers, (due, question_id))

    for k in range(args.questions):
        now = start + 20 * k
        run_timers(now)
        for m in range(10):
            i = next(next_mover)
            if args.step_m:
                theta = r.rng.random() * 2 * math.pi
                positions[i] = offset_position(
                    *positions[i], args.step_m * math.cos(theta), args.step_m * math.sin(theta)
                )
            else:
                positions[i] = r.around(i % 30, 2000.0)
            location = dict(zip(("lat", "lng"), positions[i], strict=True))
            r.call(1000 + i, "update_location", {"location": location}, now + 2 * m)
        lat, lng = r.around(r.rng.randrange(30), 1000.0)
        tags = r.rng.sample(HASHTAGS, r.rng.randint(1, 2))
        question = {"title": f"Question {k} about the area?", "location": {"lat": lat, "lng": lng}, "hashtags": tags}
        reply = next(
            a.frame
            for a in r.call(1 + k % askers, "create_question", question, now).actions
            if isinstance(a, Send) and a.frame.get("type") == "reply"
        )
        question_id = reply["data"]["question"]["question_id"]
        due = r.engine.escalation_due(question_id)
        if due is not None:
            heapq.heappush(timers, (due, question_id))
    end = start + 20 * args.questions + 2000
    for now in range(start + 20 * args.questions, end + 1, 20):
        run_timers(now)
    cpu = time.process_time() - cpu0
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    young = gc.get_stats()[0]["collections"] - young0
    print(
        f"cpu {cpu:.2f} s, {1000 * cpu / args.questions:.2f} ms/question, frames {r.frames - frames0},"
        f" rows {r.rows}, young collections {young}"
    )


if __name__ == "__main__":
    main()
