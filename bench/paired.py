"""Paired A/B of the escalation bench: two trees' servers measured at the same time, on the same machine.

    python bench/paired.py [--base A] [--pairs 3] [--this-bench] [--json bench/results/paired.json] B
                           [-- escalation.py options ...]

``A`` and ``B`` are each a directory holding a checkout of dongne or a git
revision of this repository (checked out into a temporary worktree, removed
afterwards); ``--base`` defaults to this checkout. Each pair starts
``bench/escalation.py --repeat 1`` of both trees at once, each from its own
tree (its own ``PYTHONPATH``), with the same options and seed, and reads
each one's server CPU per question; the starting order alternates from pair
to pair. The result is B's CPU per question over A's, per pair and its
median. ``--this-bench`` drives both trees' servers with this checkout's
bench instead of each tree's own, so that a revision from before the
bench's current options and figures can be measured (the bench still
imports the tree's ``dongne`` for its scenario: the hotspots, the regions).

Why in pairs: this machine's speed drifts by a third within a day and by a
tenth within minutes, so runs made one after the other, even alternated,
cannot tell trees apart that differ by less than about 5 %. Two runs made at
once meet the same drift. Two servers and two loads share the two cores, so
each run's own figures are higher than a run alone would read (and its
latencies longer): only the ratio is the result. Trees measured against
themselves this way read within 1 % of each other, in all but one of five
pairs (0.976). The two runs' question phases overlap as far as their
set-ups take equally long (within a second or two): keep ``--duration``
at its 30 s or longer (with 5 s, a tree against itself read 1.085).

Everything runs on 127.0.0.1 (the escalation bench's own bounds apply);
``--timeout`` bounds each pair.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import _harness as h

#: What each run's JSON is read for, and how the table names it.
FIGURES = (
    ("server_cpu_ms_per_question", "CPU ms/question"),
    ("reply_p99_ms", "reply p99 ms"),
    ("machine_reference_ms", "reference ms"),
)


def _parser() -> argparse.ArgumentParser:
    p = h.bench_parser(__doc__ or "")
    p.add_argument("b", metavar="B", help="the tree measured: a directory or a git revision")
    p.add_argument("--base", default=str(h.REPO_DIR), metavar="A", help="what B is measured against (this checkout)")
    p.add_argument("--pairs", type=int, default=3, help="pairs of runs (default 3)")
    p.add_argument(
        "--this-bench",
        action="store_true",
        help="run this checkout's bench/escalation.py against both trees' servers, not each tree's own",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="bound on each pair, seconds (default 600)")
    h.add_json_option(p, "paired")
    return p


@contextlib.contextmanager
def _tree(spec: str) -> Iterator[Path]:
    """The checkout ``spec`` names: a directory as it is, or a git revision in a temporary worktree."""
    if Path(spec).is_dir():
        yield Path(spec).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="dongne-paired-") as tmp:
        where = Path(tmp) / "tree"
        added = subprocess.run(
            ["git", "-C", str(h.REPO_DIR), "worktree", "add", "--detach", str(where), spec],
            capture_output=True,
            text=True,
        )
        if added.returncode != 0:
            raise SystemExit(f"{spec}: neither a directory nor a git revision ({added.stderr.strip()})")
        try:
            yield where
        finally:
            subprocess.run(
                ["git", "-C", str(h.REPO_DIR), "worktree", "remove", "--force", str(where)], capture_output=True
            )


def _run_pair(
    trees: Sequence[Path], bench_args: Sequence[str], out: Path, timeout: float, this_bench: bool
) -> list[dict[str, Any]]:
    """Both trees' escalation benches at once, started in the given order; each one's first run."""
    procs = []
    for i, tree in enumerate(trees):
        env = {**os.environ, "PYTHONPATH": str(tree)}
        # These last: argparse keeps an option's last value, and the pair needs one run, in its own file.
        ours = ["--repeat", "1", "--json", str(out / f"{i}.json")]
        bench = (h.REPO_DIR if this_bench else tree) / "bench" / "escalation.py"
        cmd = [sys.executable, str(bench), *bench_args, *ours]
        log = open(out / f"{i}.log", "wb")  # noqa: SIM115 - closed below, after the process ends
        procs.append((subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=log), log))
    try:
        for proc, _log in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            log.close()
    runs = []
    for i, (proc, _log) in enumerate(procs):
        if proc.returncode != 0:
            tail = (out / f"{i}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{trees[i]}: escalation.py exited {proc.returncode}:\n{tail}")
        runs.append(json.loads((out / f"{i}.json").read_text())["runs"][0])
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bench_args: list[str] = []
    if "--" in argv:  # everything after it is the escalation bench's, whatever it looks like
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    pairs: list[dict[str, Any]] = []
    with _tree(args.base) as tree_a, _tree(args.b) as tree_b, tempfile.TemporaryDirectory() as tmp:
        print(f"# A {args.base} ({tree_a})\n# B {args.b} ({tree_b})")
        print(f"# {'this checkout' if args.this_bench else 'each tree'}'s escalation.py {' '.join(bench_args)}")
        for n in range(args.pairs):
            order = (tree_a, tree_b) if n % 2 == 0 else (tree_b, tree_a)
            first, second = _run_pair(order, bench_args, Path(tmp), args.timeout, args.this_bench)
            a, b = (first, second) if n % 2 == 0 else (second, first)
            pair = {
                "started_first": "A" if n % 2 == 0 else "B",
                "a": {key: a[key] for key, _ in FIGURES},
                "b": {key: b[key] for key, _ in FIGURES},
                "b_over_a": b["server_cpu_ms_per_question"] / a["server_cpu_ms_per_question"],
            }
            pairs.append(pair)
            print(f"[{n + 1}/{args.pairs}] B/A {pair['b_over_a']:.3f}", flush=True)
    ratios = [p["b_over_a"] for p in pairs]
    headers = ["pair", "first", *(f"A {name}" for _, name in FIGURES), *(f"B {name}" for _, name in FIGURES), "B/A"]
    rows = [
        [n + 1, p["started_first"], *(p["a"][k] for k, _ in FIGURES), *(p["b"][k] for k, _ in FIGURES), p["b_over_a"]]
        for n, p in enumerate(pairs)
    ]
    print(h.format_table(headers, rows))
    summary = {"b_over_a_median": h.median(ratios), "b_over_a_min": min(ratios), "b_over_a_max": max(ratios)}
    print(f"B/A CPU per question: median {summary['b_over_a_median']:.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    report = {**h.report_head("paired", args, escalation_args=bench_args), "pairs": pairs, **summary}
    print(f"wrote {h.write_json(args.json, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
