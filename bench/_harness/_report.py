"""A bench's scaffolding and results: its parser, time limit and report head; statistics, tables, JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import signal
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._proc import cpu_seconds, machine_busy_seconds

__all__ = [
    "BENCH_DIR",
    "REPO_DIR",
    "add_json_option",
    "background_cores",
    "bench_parser",
    "format_table",
    "machine_reference_ms",
    "median",
    "percentile",
    "report_head",
    "time_limit",
    "write_json",
    "write_report",
]

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a bench's docstring."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_json_option(parser: argparse.ArgumentParser, bench: str) -> None:
    """``--json PATH``, by default ``bench/results/<bench>.json``."""
    parser.add_argument(
        "--json",
        default=str(BENCH_DIR / "results" / f"{bench}.json"),
        metavar="PATH",
        help="where to write the results",
    )


def _on_alarm(signum: int, frame: Any) -> None:
    raise TimeoutError("the bench exceeded --timeout")


def _on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Bound the block by ``seconds``: SIGALRM then raises ``TimeoutError`` in the main thread.

    SIGTERM raises ``SystemExit(128 + 15)`` from here on, so that a killed bench
    still unwinds its ``finally`` blocks and stops its subprocesses.
    """
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)


def report_head(bench: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The first keys of a bench's JSON report: name, time, machine, ``extra``, and the options (``--json`` aside)."""
    return {
        "bench": bench,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **extra,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }


def background_cores(pids: Iterable[int], seconds: float = 1.0) -> float:
    """CPU cores busy with other work (not ``pids``, not this process) over ``seconds``."""
    ours = [*pids, os.getpid()]
    busy0, own0 = machine_busy_seconds(), sum(cpu_seconds(p) for p in ours)
    time.sleep(seconds)
    busy1, own1 = machine_busy_seconds(), sum(cpu_seconds(p) for p in ours)
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds


def _reference_workload() -> int:
    """A fixed workload, much like a server's: short-lived objects, dict and list work, reads spread over ~16 MB."""
    rng = random.Random(7)
    table = {f"user-{i:06d}": [i, i * 0.5, str(i)] for i in range(80_000)}
    keys = list(table)
    rng.shuffle(keys)
    total = 0
    for key in keys:  # in random order: most reads miss the CPU's caches
        row = table[key]
        total += row[0] + len(row[2])
    ordered = sorted(table.values(), key=lambda row: row[2])
    return total + len({row[1] for row in ordered[::3]})


def machine_reference_ms(rounds: int = 5) -> float:
    """The fastest of ``rounds`` runs of :func:`_reference_workload`, in ms of CPU time: how fast the machine is now.

    It runs no dongne code. The machines these benches run on drift: the
    same tree's CPU per question differed by a third between hours of one
    day. A figure read beside this one (as a ratio) compares across runs
    made at different times; two trees are best compared at the same time (``bench/paired.py``).
    """
    best = math.inf
    for _ in range(rounds):
        started = time.process_time()
        _reference_workload()
        best = min(best, time.process_time() - started)
    return 1000 * best


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table, right-aligned numbers."""
    text_rows = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for row in text_rows:
        out.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False)))
        )
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, creating the parent directory."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return target


def write_report(path: str | os.PathLike[str], report: Any) -> Path:
    """``write_json``, then ``wrote PATH`` on stdout: a bench's last word."""
    target = write_json(path, report)
    print(f"wrote {target}")
    return target
