"""``dongne serve`` with a probe: ``bench/soak.py --malloc-stats`` runs the server under this.

    SOAK_TRACE_FRAMES=N SOAK_TRACE_DIR=DIR python bench/_soak_probe.py serve ...

The server code is unchanged (trio only claims SIGINT and SIGTERM): this
installs a SIGUSR1 handler, then calls ``dongne.cli.main`` with the
arguments. On SIGUSR1 the handler reads ``SOAK_TRACE_DIR/request``
(``N ACTION``), acts in the main thread between two bytecodes and writes
``reply-N.json`` (atomically, by rename); whatever happens, it never raises
into the server. The actions:

* ``stats`` (every sample): glibc's ``malloc_info`` (in use and held free, the
  main arena apart from the worker threads'), pymalloc's
  ``sys._debugmallocstats``, SQLite's ``sqlite3_memory_used``, the count of
  full gc collections.
* ``snapshot`` (after the warm-up and near the end): the same plus live
  objects by type; with tracemalloc (``SOAK_TRACE_FRAMES`` > 0, the frames
  it keeps per allocation), also the cyclic garbage a full collection finds
  (by type and allocation site) and a tracemalloc snapshot,
  ``snap-N.pickle``.
* ``garbage`` (after the load and its last sample): that collection, by type.
* ``trim``: ``malloc_trim(0)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import signal
import sys
import tempfile
import tracemalloc
from collections import Counter
from typing import Any

_frames = 0
_out_dir = ""
_libc: Any = None
_libsqlite: Any = None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _load_libraries() -> None:
    global _libc, _libsqlite
    _libc = ctypes.CDLL("libc.so.6")
    _libc.fopen.restype = ctypes.c_void_p
    _libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    _libc.fclose.argtypes = [ctypes.c_void_p]
    _libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _libc.malloc_trim.argtypes = [ctypes.c_size_t]
    _libc.mallinfo2.restype = _Mallinfo2
    try:  # the SQLite library the sqlite3 module is linked with (the same instance)
        _libsqlite = ctypes.CDLL("libsqlite3.so.0")
        _libsqlite.sqlite3_memory_used.restype = ctypes.c_int64
    except OSError:
        _libsqlite = None


def _int(text: str, pattern: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1).replace(",", "")) if m else 0


def glibc_arenas() -> dict[str, int]:
    """glibc's own account (``malloc_info``): bytes in use and held free, main arena and threads' arenas."""
    path = os.path.join(_out_dir, "malloc_info.xml")
    fp = _libc.fopen(path.encode(), b"w")
    _libc.malloc_info(0, fp)
    _libc.fclose(fp)
    with open(path) as fh:
        text = fh.read()
    out = dict.fromkeys(("main_in_use", "main_free", "threads_in_use", "threads_free", "mmapped", "arenas"), 0)
    for nr, body in re.findall(r'<heap nr="(\d+)">(.*?)</heap>', text, re.S):
        free = sum(int(x) for x in re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"/>', body))
        held = _int(body, r'<system type="current" size="(\d+)"/>')
        kind = "main" if nr == "0" else "threads"
        out[kind + "_in_use"] += held - free
        out[kind + "_free"] += free
        out["arenas"] += 1
    out["mmapped"] = _int(text.rsplit("</heap>", 1)[-1], r'<total type="mmap" count="\d+" size="(\d+)"/>')
    # Of main_free: the top chunk, which free() trims past M_TRIM_THRESHOLD.
    out["main_top"] = _libc.mallinfo2().keepcost
    return {"glibc_" + k: v for k, v in out.items()}


def pymalloc_arenas() -> dict[str, int]:
    """pymalloc's account: bytes of arenas held, bytes in allocated blocks."""
    # sys._debugmallocstats writes to the C stderr: lend it a file for a moment.
    with tempfile.TemporaryFile("w+", dir=_out_dir) as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read()
    arenas = _int(text, r"# arenas allocated current\s*=\s*([\d,]+)")
    return {
        "pymalloc_arenas_bytes": arenas * _int(text, r"arenas \* ([\d,]+) bytes/arena"),
        "pymalloc_in_use": _int(text, r"# bytes in allocated blocks\s*=\s*([\d,]+)"),
    }


def _reply(n: str, data: dict[str, Any]) -> None:
    path = os.path.join(_out_dir, f"reply-{n}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh)
    os.rename(path + ".tmp", path)


def _type_name(t: type) -> str:
    module = t.__dict__.get("__module__")
    return f"{module}.{t.__qualname__}" if isinstance(module, str) else t.__qualname__


def _garbage() -> dict[str, Any]:
    """What a full collection frees: cyclic garbage the collector had not reached yet.

    Counted by comparing the tracked objects before and after (``gc.garbage``
    would miss cycles through suspended generators: their finalizer breaks the
    cycle and reference counting frees the rest).
    """
    before = {}
    for o in gc.get_objects():
        tb = tracemalloc.get_object_traceback(o) if _frames else None
        before[id(o)] = (_type_name(type(o)), sys.getsizeof(o), tb)
    o = tb = None  # drop the last references the loop holds
    used = pymalloc_arenas()["pymalloc_in_use"] + glibc_arenas()["glibc_main_in_use"]
    gc.collect()
    freed_bytes = used - pymalloc_arenas()["pymalloc_in_use"] - glibc_arenas()["glibc_main_in_use"]
    after = {id(o) for o in gc.get_objects()}
    by_type: Counter[str] = Counter()
    by_site: Counter[str] = Counter()
    for key, (name, size, trace) in before.items():
        if key in after:
            continue
        by_type[name] += 1
        if trace is not None:  # with --tracemalloc
            mine = [f for f in trace if "/dongne/" in f.filename] or list(trace)
            by_site[f"{mine[-1].filename}:{mine[-1].lineno}"] += size
    return {
        "garbage_objects": sum(by_type.values()), "garbage_freed_bytes": freed_bytes,
        "garbage_by_type": dict(by_type.most_common(20)), "garbage_bytes_by_site": dict(by_site.most_common(20)),
    }  # fmt: skip


def _act(n: str, action: str) -> dict[str, Any]:
    if action == "trim":
        _libc.malloc_trim(0)
        return {}
    if action == "garbage":
        return _garbage()
    data: dict[str, Any] = {**glibc_arenas(), **pymalloc_arenas()}
    if _libsqlite is not None:
        data["sqlite_memory_used"] = _libsqlite.sqlite3_memory_used()
    data["gc_full_collections"] = gc.get_stats()[2]["collections"]
    if action == "snapshot":
        if _frames:  # not in the cheap mode: a collection would change what is measured
            data.update(_garbage())
        data["objects_by_type"] = dict(Counter(_type_name(type(o)) for o in gc.get_objects()))
        if _frames:
            tracemalloc.take_snapshot().dump(os.path.join(_out_dir, f"snap-{n}.pickle"))
            data.update(traced=tracemalloc.get_traced_memory()[0], overhead=tracemalloc.get_tracemalloc_memory())
    return data


def _on_request(signum: int, frame: Any) -> None:
    # Whatever happens, nothing is raised into the server.
    with contextlib.suppress(Exception):
        with open(os.path.join(_out_dir, "request")) as fh:
            n, action = fh.read().split()
        try:
            data = _act(n, action)
        except Exception as exc:
            data = {"error": repr(exc)}
        _reply(n, data)


def main(argv: list[str]) -> int:
    """Install the probe, then run ``dongne`` with ``argv`` (``serve ...``)."""
    global _frames, _out_dir
    _frames = int(os.environ["SOAK_TRACE_FRAMES"])
    _out_dir = os.environ["SOAK_TRACE_DIR"]
    if _frames:
        tracemalloc.start(_frames)
    _load_libraries()
    signal.signal(signal.SIGUSR1, _on_request)
    from dongne.cli import main as dongne_main

    return dongne_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
