"""Read-path bench: p99 of the four list/page reads over a large stored history, and the server's RSS beside it.

    python bench/reads.py [--questions 100000] [--users 10000] [--events N] [--readers 200]
                          [--duration 30] [--max-requests 300000] [--think-ms 1000]
                          [--compare-sizes] [--ops get_question,my_questions,...]
                          [--json bench/results/reads.json] ...

What it does:

* **Database.** Built directly (no server): ``dongne.store.Store(path).open()``
  creates the schema, then sqlite3 ``executemany`` in one transaction fills
  it. ``--users`` users (20% verified locals with a home position and
  expertise tags), ``--questions`` questions spread uniformly over the last
  ``--days`` (20) days, ids like the server's (``q`` + created_at ms in 12 hex
  digits + 8 random hex digits), at points drawn inside the bundled Jeju
  regions (``dongne.core.load_default_regions()``), 0-3 hashtags each (also in
  ``question_hashtags``). The newest 0.3% (at least 30) are ``open`` or
  ``answered``; the rest ``resolved`` (55%), ``closed`` (30%) or ``expired``
  (15%); 0.5% are soft-deleted. Askers are skewed (a few heavy askers), answer
  authors are locals, skewed too; ~2 answers a question. ``--events``
  durable events (default 10 per question: 1,000,000 at 100k questions, 100,000
  at 10k): one ``answer_notification`` per answer to its asker, one
  ``answer_accepted_notification`` per accepted answer to its author, and the
  rest ``new_question_notification`` to random locals (stages IMMEDIATE, QUICK,
  EXTENDED, FINAL, at their offsets), all with the wire-shaped msgpack data the
  server writes, inserted in time order (as the server appends them) with
  gap-free per-user seqs 1..n; ``users.last_seq`` and a ``read_seq`` a few
  events behind it. Fixed seed (``--seed``). The database is cached under
  ``--cache-dir`` (default ``/tmp/dongne-bench-reads``) keyed by its sizes and
  seed, regenerated when older than ``--max-cache-age-h`` (12 h: the hot
  window and the open questions are relative to the time it was built), and
  copied fresh for every run.
* **Server.** ``python -m dongne serve`` on the copy (``synchronous=NORMAL``,
  abuse limits lifted, ``[limits] reads_per_s`` / ``reads_burst`` at 10^6). Its
  start-up time includes loading the database (all users, every open question
  and every question of the last ``max(hot_question_days, slo_window_days)``
  = 7 days with its answers).
* **Readers.** ``--readers`` (200) connections, one per user (half askers
  chosen by how much they asked, half locals), in ``--client-procs`` epoll
  processes. Each says ``hello``, then, once all are ready, loops over the four
  operations in turn (closed loop: send, wait for the reply, think for an
  exponential ``--think-ms`` (1000 ms mean: ~200 requests a second in all), send the next) for ``--duration``
  seconds or ``--max-requests`` requests in all, whichever comes first:

  - ``get_question`` of a random existing question (a sample of 5,000);
  - ``my_questions`` with status ``all`` / ``open`` / ``answered`` / ``closed``;
  - ``browse_questions`` by region (40%), by hashtag (30%), by region and
    hashtag (10%), each with status ``open`` or ``all`` half the time, or the
    open questions everywhere (20%); regions and hashtags drawn with the
    weights the questions were generated with;
  - ``list_notifications``, one in five filtered by one event type.

  A third of the time a reader follows the ``next`` cursor
  (``next_before_seq``) of its previous reply of that operation instead, when
  there was one. Latency is client-side, from the send to the reply's receipt
  (``time.time()`` in the client process).
* **Reported:** per operation: replies, cursor pages followed, items per
  reply, p50, p95, p99, max (ms), error replies by code; the request rate;
  server CPU; server RSS after start-up (the database loaded), with the
  readers connected, its peak during the run, after the run, and after the
  readers left. ``--compare-sizes`` runs three databases: 10,000 and 100,000
  questions over ``--days`` (events scaled with them, 10 a question; users
  kept), and 100,000 over ten times ``--days`` (the 10k database's rate: about
  the same questions in the server's 7-day hot window, ten times the history
  behind it), and reports the RSS ratios. Targets: p99 < 10 ms for each
  operation; RSS not growing with the history.

On this 2-core machine the load generator, the server and whatever else runs
share the cores: the background load is measured and reported before each run.
Everything runs on 127.0.0.1; counts and waits are bounded; subprocesses are
killed on exit (also on Ctrl-C, SIGTERM and ``--timeout``).
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import heapq
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import random
import secrets
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

GEN_VERSION = 1
OPS = ("get_question", "my_questions", "browse_questions", "list_notifications")
HASHTAGS = [
    ("food", 20), ("beach", 12), ("cafe", 12), ("hiking", 9), ("blackpork", 8), ("bus", 8), ("weather", 7),
    ("olle", 6), ("market", 6), ("sunrise", 4), ("parking", 4), ("taxi", 4), ("hallasan", 3), ("rain", 3),
    ("kids", 3), ("night", 2), ("seafood", 2), ("museum", 1), ("흑돼지", 2), ("맛집", 3),
]  # fmt: skip
REGION_WEIGHT = {"Jeju-si": 30, "Seogwipo": 18, "Aewol": 8, "Jungmun": 7, "Seongsan": 6, "Hallim": 5, "Jocheon": 4}
TITLES = [
    "Where is the best {tag} near {region}?",
    "Is the road to {region} open right now?",
    "Any {tag} place still open in {region} tonight?",
    "How busy is {region} this afternoon?",
    "Good spot for {tag} around {region}?",
    "Which bus goes from the airport to {region}?",
    "Is it raining in {region} at the moment?",
    "Recommend a quiet cafe in {region}?",
]
ANSWERS = [
    "Try the place two streets behind the harbour, open till late.",
    "Yes, it was clear twenty minutes ago, no traffic.",
    "Take the 202, every 15 minutes from stop 4.",
    "Very busy today, go before 10 if you can.",
    "The market on the corner has the best one, ask for the set menu.",
    "Not raining here, but cloudy toward the mountain.",
]
STAGES = (("IMMEDIATE", 0, "high", "urgent", "strong"), ("QUICK", 3_000, "normal", "normal", "light"),
          ("EXTENDED", 30_000, "normal", "normal", "light"), ("FINAL", 120_000, "normal", "normal", "light"))  # fmt: skip
DAY_MS = 86_400_000
HELLO_ID, REQ_ID0 = 1, 100

# ---- the database ---------------------------------------------------------------------------


def _region_points(rng: random.Random, per_region: int) -> dict[str, list[tuple[float, float]]]:
    """``per_region`` random points inside each bundled region."""
    from dongne.core import load_default_regions

    regions = load_default_regions()
    points: dict[str, list[tuple[float, float]]] = {}
    for name in regions.names:
        geom = regions.geometry(name)
        min_lng, min_lat, max_lng, max_lat = geom.bounds
        found: list[tuple[float, float]] = []
        for _ in range(per_region * 200):
            lat, lng = rng.uniform(min_lat, max_lat), rng.uniform(min_lng, max_lng)
            if regions.region_of(lat, lng) == name:
                found.append((round(lat, 6), round(lng, 6)))
                if len(found) == per_region:
                    break
        if found:
            points[name] = found
    return points


def _cum(weights: list[float]) -> list[float]:
    return list(itertools.accumulate(weights))


def _pick(rng: random.Random, items: list[Any], cum: list[float]) -> Any:
    return items[bisect.bisect_right(cum, rng.random() * cum[-1])]


def build_db(path: Path, *, users: int, questions: int, events: int, days: float, seed: int) -> dict[str, Any]:
    """Create and fill the database at ``path``; returns what was built (counts, time span)."""
    from dongne.store import Store

    t0 = time.monotonic()
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    store = Store(path)
    store.open()
    store.close()

    # Users: 20% locals.
    n_locals = max(1, users // 5)
    user_ids = [f"u{i:05d}" for i in range(users)]
    is_local = [i < n_locals for i in range(users)]
    rng.shuffle(is_local)
    nicks = [f"{rng.choice(['Mina', 'Jun', 'Seo', 'Hana', 'Min', 'Ji', 'Woo', 'Yuna'])}{i}" for i in range(users)]
    locals_ = [i for i in range(users) if is_local[i]]
    askers = [i for i in range(users) if not is_local[i]]
    rng.shuffle(locals_)
    rng.shuffle(askers)
    asker_cum = _cum([1.0 / (k + 50) for k in range(len(askers))])
    author_cum = _cum([1.0 / (k + 10) for k in range(len(locals_))])
    tags_all = [t for t, _ in HASHTAGS]
    tag_cum = _cum([float(w) for _, w in HASHTAGS])
    points = _region_points(rng, 300)
    region_names = sorted(points)
    region_cum = _cum([float(REGION_WEIGHT.get(r, 2)) for r in region_names])

    # Questions, oldest first.
    start = now - int(days * DAY_MS)
    times = sorted(rng.randrange(start, now - 60_000) for _ in range(questions))
    n_active = max(30, questions * 3 // 1000)
    q_rows: list[tuple[Any, ...]] = []
    h_rows: list[tuple[Any, ...]] = []
    a_rows: list[tuple[Any, ...]] = []
    briefs: list[dict[str, Any]] = []
    q_ids: list[str] = []
    q_titles: list[str] = []
    q_asker: list[int] = []
    answer_wire: list[dict[str, Any]] = []
    answer_author: list[int] = []
    answer_q: list[int] = []
    # Events before sorting: (created_at, user index, kind, ref); kind 0 new question (ref: (q, stage, dist)),
    # 1 answer_notification (ref: answer index), 2 answer_accepted_notification (ref: answer index).
    evs: list[tuple[int, int, int, Any]] = []
    accepted_total = 0
    for qi, created in enumerate(times):
        qid = f"q{created:012x}{rng.getrandbits(32):08x}"
        region = _pick(rng, region_names, region_cum)
        lat, lng = rng.choice(points[region])
        tags: list[str] = []
        for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
            tag = _pick(rng, tags_all, tag_cum)
            if tag not in tags:
                tags.append(tag)
        title = rng.choice(TITLES).format(tag=tags[0] if tags else "food", region=region)
        asker = askers[bisect.bisect_right(asker_cum, rng.random() * asker_cum[-1])]
        urgency = "urgent" if rng.random() < 0.08 else "normal"
        if qi >= questions - n_active:
            status = rng.choice(("open", "answered"))
            n_answers = 0 if status == "open" else rng.choice((1, 1, 2))
        else:
            r = rng.random()
            status = "resolved" if r < 0.55 else ("closed" if r < 0.85 else "expired")
            n_answers = {
                "resolved": rng.choice((1, 2, 2, 3, 3, 4)),
                "closed": rng.choice((0, 1, 2, 2, 3, 3)),
                "expired": rng.choice((0, 0, 1)),
            }[status]
        t = created
        first_answer_at = None
        q_answers: list[int] = []
        for _ in range(n_answers):
            t += 30_000 + int(rng.expovariate(1 / 900_000))
            t = min(t, now - 1000)
            first_answer_at = first_answer_at or t
            author = locals_[bisect.bisect_right(author_cum, rng.random() * author_cum[-1])]
            aid = f"a{t:012x}{rng.getrandbits(32):08x}"
            old = now - t > DAY_MS
            r = rng.random()
            state = ("read" if r < 0.8 else "delivered" if r < 0.95 else "sent") if old else "delivered"
            content = rng.choice(ANSWERS)
            ai = len(answer_wire)
            q_answers.append(ai)
            answer_wire.append(
                {
                    "answer_id": aid, "question_id": qid, "author_id": user_ids[author], "author_nick": nicks[author],
                    "content": content, "created_at": t, "state": "delivered", "accepted": False,
                }
            )  # fmt: skip
            answer_author.append(author)
            answer_q.append(qi)
            a_rows.append(
                [aid, qid, user_ids[author], nicks[author], content, t, state,
                 t + 2000 if state != "sent" else None, t + 600_000 if state == "read" else None, 0, None]
            )  # fmt: skip
            evs.append((t, asker, 1, ai))
        accepted_id = None
        closed_at = None
        if status == "resolved":
            ai = rng.choice(q_answers)
            accepted_id = answer_wire[ai]["answer_id"]
            a_rows[ai][9] = 1
            closed_at = min(t + int(rng.expovariate(1 / 3_600_000)) + 60_000, now - 500)
            evs.append((closed_at, answer_author[ai], 2, ai))
            accepted_total += 1
        elif status == "closed":
            closed_at = min(t + int(rng.expovariate(1 / 7_200_000)) + 60_000, now - 500)
        elif status == "expired":
            closed_at = created + DAY_MS
        alerted_at = created + 600_000 if (first_answer_at or now) - created > 600_000 else None
        deleted_at = (closed_at or created) + 1000 if status != "open" and rng.random() < 0.005 else None
        body = f"{title} Arriving soon, any tip is welcome."
        q_rows.append(
            (qid, user_ids[asker], nicks[asker], title, body, lat, lng, region,
             json.dumps(tags, ensure_ascii=False), urgency, status, created, accepted_id, n_answers,
             first_answer_at, closed_at, alerted_at, deleted_at)
        )  # fmt: skip
        h_rows.extend((qid, tag, created) for tag in tags)
        briefs.append(
            {"question_id": qid, "title": title, "location": {"lat": lat, "lng": lng}, "region": region,
             "hashtags": tags, "urgency": urgency, "created_at": created, "asker_nick": nicks[asker]}
        )  # fmt: skip
        q_ids.append(qid)
        q_titles.append(title)
        q_asker.append(asker)

    # new_question_notification: the rest of the events, spread over the questions, to random locals.
    n_nq = max(0, events - len(evs))
    for qi, created in enumerate(times):
        k = min((qi + 1) * n_nq // questions - qi * n_nq // questions, len(locals_))
        if k:
            for j, who in enumerate(rng.sample(locals_, k)):
                stage = 0 if j < 10 else (1 if j < 25 else (2 if j < 35 else 3))
                evs.append((created + STAGES[stage][1] + j * 7, who, 0, (qi, stage, round(rng.uniform(80, 6000), 1))))
    evs.sort(key=lambda e: e[0])

    last_seq = [0] * users
    points_of = [0] * users
    packb = msgpack.packb
    kinds = ("new_question_notification", "answer_notification", "answer_accepted_notification")

    def event_rows() -> Any:
        for at, who, kind, ref in evs:
            last_seq[who] += 1
            if kind == 0:
                qi, stage, dist = ref
                name, _off, priority, sound, vibration = STAGES[stage]
                if briefs[qi]["urgency"] == "urgent":
                    priority, sound, vibration = "critical", "urgent", "strong"
                data: dict[str, Any] = {
                    "question_id": q_ids[qi], "question": briefs[qi], "stage": name, "priority": priority,
                    "distance_m": dist, "sound": sound, "vibration": vibration,
                }  # fmt: skip
            elif kind == 1:
                qi = answer_q[ref]
                data = {"question_id": q_ids[qi], "question_title": q_titles[qi], "answer": answer_wire[ref]}
            else:
                qi = answer_q[ref]
                points_of[who] += 10
                data = {
                    "question_id": q_ids[qi], "answer_id": answer_wire[ref]["answer_id"], "author_id": user_ids[who],
                    "points": 10, "question_title": q_titles[qi], "total_points": points_of[who],
                }  # fmt: skip
            yield (user_ids[who], last_seq[who], kinds[kind], packb(data), at)

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-400000")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO questions (question_id, asker_id, asker_nick, title, body, lat, lng, region, hashtags,"
            " urgency, status, created_at, accepted_answer_id, answer_count, first_answer_at, closed_at, alerted_at,"
            " deleted_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            q_rows,
        )
        conn.executemany("INSERT INTO question_hashtags (question_id, tag, created_at) VALUES (?,?,?)", h_rows)
        conn.executemany(
            "INSERT INTO answers (answer_id, question_id, author_id, author_nick, content, created_at, state,"
            " delivered_at, read_at, accepted, deleted_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [tuple(r) for r in a_rows],
        )
        conn.executemany("INSERT INTO events (user_id, seq, type, data, created_at) VALUES (?,?,?,?,?)", event_rows())
        created_users = now - int((days + 10) * DAY_MS)
        u_rows = []
        for i in range(users):
            home = rng.choice(points[_pick(rng, region_names, region_cum)]) if is_local[i] else (None, None)
            tags = sorted({_pick(rng, tags_all, tag_cum) for _ in range(rng.randint(1, 3))}) if is_local[i] else []
            unread = rng.randint(0, min(last_seq[i], 15))
            u_rows.append(
                (user_ids[i], nicks[i], int(is_local[i]), json.dumps(tags, ensure_ascii=False), "user", points_of[i],
                 last_seq[i], created_users + i, 1, None, None, 20, home[0], home[1], last_seq[i] - unread)
            )  # fmt: skip
        conn.executemany(
            "INSERT INTO users (user_id, nick, local, tags, role, points, last_seq, created_at, immediate_alerts,"
            " quiet_start, quiet_end, max_alerts_per_hour, home_lat, home_lng, read_seq)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            u_rows,
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
    return {
        "built_at_ms": now,
        "build_s": round(time.monotonic() - t0, 1),
        "users": users,
        "locals": n_locals,
        "questions": questions,
        "active_questions": n_active,
        "answers": len(a_rows),
        "accepted": accepted_total,
        "events": len(evs),
        "days": days,
        "db_bytes": path.stat().st_size,
    }


def cached_db(args: argparse.Namespace, questions: int, events: int, days: float) -> tuple[Path, dict[str, Any]]:
    """The cached database for these sizes (built, or rebuilt when too old); its description."""
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = f"reads-u{args.users}-q{questions}-e{events}-d{days:g}-s{args.seed}-v{GEN_VERSION}"
    db, meta_path = cache / f"{key}.sqlite3", cache / f"{key}.json"
    meta: dict[str, Any] | None = None
    if db.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        age_h = (time.time() * 1000 - meta["built_at_ms"]) / 3_600_000
        if age_h > args.max_cache_age_h:
            print(f"cached {db.name} is {age_h:.1f} h old: rebuilding", flush=True)
            meta = None
    if meta is None:
        print(f"building {db} ({questions:,} questions over {days:g} days, {events:,} events) ...", flush=True)
        meta_path.unlink(missing_ok=True)
        meta = build_db(db, users=args.users, questions=questions, events=events, days=days, seed=args.seed)
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"  built in {meta['build_s']} s, {meta['db_bytes'] / 1e6:.0f} MB", flush=True)
    meta["age_h"] = round((time.time() * 1000 - meta["built_at_ms"]) / 3_600_000, 2)
    return db, meta


# ---- the readers' client processes ----------------------------------------------------------------


class _Reader(h.LoadConn):
    __slots__ = ("k", "nexts", "op", "page", "params", "rid", "sent", "token")

    def __init__(self, sock: socket.socket, job: tuple[str, str]) -> None:
        user, token = job
        super().__init__(sock, user)
        self.token = token
        self.k = 0  # which operation comes next (round robin over the ops)
        self.rid = REQ_ID0
        self.sent = 0.0
        self.op = ""
        self.params: dict[str, Any] = {}
        self.page = False
        self.nexts: dict[str, tuple[dict[str, Any], Any]] = {}  # op -> (params, cursor of its last reply)


def _variant(op: str, params: dict[str, Any], page: bool) -> str:
    """What kind of request this was, for the breakdown table ("" for none)."""
    more = " (next page)" if page else ""
    if op == "browse_questions":
        by = "+".join(k for k in ("region", "hashtag") if k in params) or "everywhere"
        return f"browse {by}, {params.get('status', 'open')}{more}"
    if op == "my_questions":
        return f"my_questions {params.get('status', 'all')}{more}"
    if op == "list_notifications":
        return f"list_notifications {'one type' if params.get('types') else 'all types'}{more}"
    return ""


def _reader_worker(pipe: multiprocessing.connection.Connection, spec: dict[str, Any]) -> None:
    """Drive ``spec["jobs"]`` readers from one process (one ``h.EpollClients`` loop).

    To the parent: ``("ready", ok, failed, errors)`` once every reader said
    hello; ``("done", result)`` when the run is over. From the parent:
    ``("go", duration_s, max_requests, think_ms)`` and ``"close"``.
    """
    loop = h.EpollClients[_Reader](pipe, spec, what="readers")
    loop.poll_s = 0.001
    rng = random.Random(spec["seed"])
    ops: list[str] = spec["ops"]
    sample: list[str] = spec["question_sample"]
    regions: list[str] = spec["regions"]
    region_cum = _cum([float(REGION_WEIGHT.get(r, 2)) for r in regions])
    tags = [t for t, _ in HASHTAGS]
    tag_cum = _cum([float(w) for _, w in HASHTAGS])
    types = ["answer_notification", "new_question_notification", "answer_accepted_notification"]
    unpackb, packb, encode = msgpack.unpackb, msgpack.packb, h.encode_client_frame
    OP_BINARY, OP_PING, OP_PONG, OP_CLOSE = h.OP_BINARY, h.OP_PING, h.OP_PONG, h.OP_CLOSE
    fail = loop.fail

    lat: dict[str, array.array[float]] = {op: array.array("d") for op in ops}
    by_variant: dict[str, array.array[float]] = {}  # "op variant" -> latencies (s)
    items: dict[str, int] = dict.fromkeys(ops, 0)
    pages: dict[str, int] = dict.fromkeys(ops, 0)
    errors: dict[str, int] = {}
    events_seen = 0
    due: list[tuple[float, int]] = []  # (when, fd): readers thinking
    run = {"on": False, "end": 0.0, "left": 0, "think": 0.1, "inflight": 0, "done_sent": False, "stopped_at": 0.0}

    def params_for(c: _Reader, op: str) -> tuple[dict[str, Any], bool]:
        prev = c.nexts.get(op)
        if prev is not None and prev[1] is not None and rng.random() < 1 / 3:
            p, cursor = prev
            key = {"list_notifications": "before_seq", "get_question": "answers_after"}.get(op, "before")
            return {**p, key: cursor}, True
        if op == "get_question":
            return {"question_id": rng.choice(sample)}, False
        if op == "my_questions":
            return {"status": rng.choice(("all", "all", "open", "answered", "closed", "closed"))}, False
        if op == "browse_questions":
            r = rng.random()
            status = rng.choice(("open", "all"))
            if r < 0.4:
                return {"region": _pick(rng, regions, region_cum), "status": status}, False
            if r < 0.7:
                return {"hashtag": _pick(rng, tags, tag_cum), "status": status}, False
            if r < 0.8:
                region, tag = _pick(rng, regions, region_cum), _pick(rng, tags, tag_cum)
                return {"region": region, "hashtag": tag, "status": status}, False
            return {"status": "open"}, False
        if op == "list_notifications":
            return ({"types": [rng.choice(types)]} if rng.random() < 0.2 else {}), False
        return {}, False

    def send_next(c: _Reader, now: float) -> None:
        op = ops[c.k % len(ops)]
        c.k += 1
        c.params, c.page = params_for(c, op)
        c.op = op
        c.rid += 1
        c.sent = time.time()
        run["inflight"] += 1
        run["left"] -= 1
        try:
            c.sock.send(encode(OP_BINARY, packb({"type": op, "id": c.rid, "data": c.params})))
        except OSError as exc:
            run["inflight"] -= 1
            fail(c, f"send {op}: {exc}", "send_error")

    def schedule(c: _Reader, now: float) -> None:
        if run["on"] and run["left"] > 0 and time.monotonic() < run["end"]:
            heapq.heappush(due, (now + (rng.expovariate(1000 / run["think"]) if run["think"] > 0 else 0), c.fd))

    def on_upgraded(c: _Reader) -> None:
        try:
            c.sock.send(encode(OP_BINARY, packb({"type": "hello", "id": HELLO_ID, "data": {"token": c.token}})))
        except OSError as exc:
            fail(c, f"send hello: {exc}", "send_error")

    def on_frame(c: _Reader, opcode: int, payload: bytes, now: float) -> None:
        nonlocal events_seen
        if opcode == OP_PING:
            with contextlib.suppress(OSError):
                c.sock.send(encode(OP_PONG, payload))
            return
        if opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
            fail(c, f"closed by the server ({code})", f"close_{code}")
            return
        if opcode != OP_BINARY:
            return
        frame = unpackb(payload)
        if frame.get("type") != "reply":
            events_seen += 1
            return
        rid = frame.get("id")
        if rid == HELLO_ID:
            if frame.get("ok"):
                loop.ready(c)
            else:
                fail(c, f"hello refused: {frame.get('error')}", "hello")
            return
        if rid != c.rid:
            return
        run["inflight"] -= 1
        op = c.op
        if frame.get("ok"):
            lat[op].append(now - c.sent)
            variant = _variant(op, c.params, c.page)
            if variant:
                by_variant.setdefault(variant, array.array("d")).append(now - c.sent)
            data = frame.get("data") or {}
            if c.page:
                pages[op] += 1
            base = {k: v for k, v in c.params.items() if k not in ("before", "before_seq", "answers_after")}
            if op == "get_question":
                items[op] += len(data.get("answers") or ())
                c.nexts[op] = (base, data.get("next"))
            elif op == "list_notifications":
                items[op] += len(data.get("notifications") or ())
                c.nexts[op] = (base, data.get("next_before_seq"))
            elif op in ("my_questions", "browse_questions"):
                items[op] += len(data.get("questions") or ())
                c.nexts[op] = (base, data.get("next"))
        else:
            code = (frame.get("error") or {}).get("code", "?")
            key = f"{op}:{code}"
            errors[key] = errors.get(key, 0) + 1
            c.nexts.pop(op, None)
        schedule(c, time.monotonic())

    def tick() -> None:
        if not run["on"]:
            return
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, fd = heapq.heappop(due)
            c = loop.conns.get(fd)
            if c is None or c.state != h.READY:
                continue
            if run["left"] <= 0 or now >= run["end"]:
                due.clear()
                break
            send_next(c, now)
        if not run["done_sent"] and (now >= run["end"] or run["left"] <= 0):
            if not run["stopped_at"]:
                run["stopped_at"] = now
            if run["inflight"] <= 0 or now - run["stopped_at"] > 10:
                run["done_sent"] = True
                pipe.send(
                    (
                        "done",
                        {
                            "lat": {op: v.tobytes() for op, v in lat.items()},
                            "variants": {k: v.tobytes() for k, v in by_variant.items()},
                            "items": items,
                            "pages": pages,
                            "errors": errors,
                            "unanswered": run["inflight"],
                            "events": events_seen,
                            "dead": loop.dead_after_ready,
                            "closes": dict(loop.closes),
                            "conn_errors": loop.errors,
                        },
                    )
                )

    def on_command(cmd: Any) -> None:
        if isinstance(cmd, tuple) and cmd[0] == "go":
            _, duration, max_requests, think_ms = cmd
            run.update(on=True, end=time.monotonic() + duration, left=max_requests, think=think_ms)
            now = time.monotonic()
            for c in list(loop.conns.values()):
                if c.state == h.READY:
                    heapq.heappush(due, (now + rng.random() * max(think_ms, 1) / 1000, c.fd))

    loop.run(new_conn=_Reader, on_upgraded=on_upgraded, on_frame=on_frame, tick=tick, on_command=on_command)


# ---- one run ------------------------------------------------------------------------------------------


def _pct(sorted_ms: list[float], q: float) -> float:
    return h.percentile(sorted_ms, q) if sorted_ms else math.nan


def run_size(
    args: argparse.Namespace, ctx: Any, questions: int, events: int, days: float, secret: str, tmp: Path
) -> dict[str, Any]:
    from dongne.auth import mint_token

    src, meta = cached_db(args, questions, events, days)
    db = tmp / f"reads-{questions}-{days:g}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(src, db)

    rng = random.Random(args.seed + 7)
    conn = sqlite3.connect(db)
    try:
        users = {u: (nick, bool(local)) for u, nick, local in conn.execute("SELECT user_id, nick, local FROM users")}
        ask_counts = conn.execute("SELECT asker_id, count(*) FROM questions GROUP BY asker_id").fetchall()
        sample = [
            r[0]
            for r in conn.execute(
                "SELECT question_id FROM questions WHERE deleted_at IS NULL ORDER BY random() LIMIT 5000"
            )
        ]
        regions = sorted(r[0] for r in conn.execute("SELECT DISTINCT region FROM questions") if r[0])
        hot = conn.execute(
            "SELECT count(*) FROM questions WHERE deleted_at IS NULL"
            " AND (status IN ('open', 'answered') OR (created_at >= ? AND status != 'expired'))",
            (int(time.time() * 1000) - 7 * DAY_MS,),
        ).fetchone()[0]
    finally:
        conn.close()
    # Readers: half askers (picked by how much they asked), half locals.
    asker_ids = [a for a, _ in ask_counts]
    asker_w = [n for _, n in ask_counts]
    chosen: list[str] = []
    seen: set[str] = set()
    locals_ = sorted(u for u, (_n, loc) in users.items() if loc)
    while len(chosen) < args.readers // 2 and len(seen) < len(asker_ids):
        u = rng.choices(asker_ids, asker_w)[0]
        if u not in seen:
            seen.add(u)
            chosen.append(u)
    for u in rng.sample(locals_, min(len(locals_), args.readers - len(chosen))):
        if u not in seen:
            seen.add(u)
            chosen.append(u)
    now_s = time.time()
    jobs = [(u, mint_token(secret, u, nick=users[u][0], local=users[u][1], now_s=now_s, ttl_s=3600)) for u in chosen]

    background = h.background_cores([], 1.0)
    t_start = time.monotonic()
    server = h.start_dongne(
        db,
        jwt_secret=secret,
        synchronous="NORMAL",
        extra_env={"DONGNE_LIMITS_READS_PER_S": "1000000", "DONGNE_LIMITS_READS_BURST": "1000000"},
        timeout=300.0,
    )
    start_s = time.monotonic() - t_start
    pool = None
    try:
        time.sleep(1.0)
        rss_started = server.rss_bytes()
        spec = {
            "host": "127.0.0.1",
            "port": server.port,
            "setup_s": 60.0,
            "life_s": args.duration + 180.0,
            "max_connecting": 200,
            "ops": args.ops,
            "question_sample": sample,
            "regions": regions,
        }
        pool = h.ClientPool(
            ctx,
            _reader_worker,
            args.client_procs,
            jobs,
            spec,
            name="reader",
            per_process=lambda i: {"seed": args.seed * 1000 + i},
        )
        pool.wait_ready(len(jobs), "readers", 90.0)
        time.sleep(0.5)
        rss_connected = server.rss_bytes()
        per_proc = -(-args.max_requests // len(pool.pipes))
        cpu0, ccpu0, busy0 = server.cpu_seconds(), pool.cpu_seconds(), h.machine_busy_seconds()
        t0 = time.monotonic()
        pool.broadcast(("go", args.duration, per_proc, args.think_ms))
        rss_peak = rss_connected
        results: list[tuple[Any, ...] | None] = [None] * len(pool.pipes)
        deadline = t0 + args.duration + 30
        while any(r is None for r in results) and time.monotonic() < deadline:
            for ready in multiprocessing.connection.wait(pool.pipes, timeout=0.5):
                i = pool.pipes.index(ready)  # type: ignore[arg-type]
                msg = pool.pipes[i].recv()
                if msg[0] == "done":
                    results[i] = msg
            rss_peak = max(rss_peak, server.rss_bytes())
        elapsed = time.monotonic() - t0
        cpu = server.cpu_seconds() - cpu0
        ccpu = pool.cpu_seconds() - ccpu0
        busy = h.machine_busy_seconds() - busy0
        rss_after = server.rss_bytes()
        if any(r is None for r in results):
            raise RuntimeError("a reader process did not report in time")
        pool.close()
        pool = None
        time.sleep(2.0)
        rss_left = server.rss_bytes()
        alive = server.alive()
    finally:
        if pool is not None:
            pool.close()
        server.stop()

    per_op: dict[str, Any] = {}
    errors: dict[str, int] = {}
    total = 0
    extra = {"unanswered": 0, "events": 0, "dead": 0, "closes": {}, "conn_errors": []}
    for msg in results:
        assert msg is not None
        res = msg[1]
        for k, v in res["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k in ("unanswered", "events", "dead"):
            extra[k] += res[k]
        for k, v in res["closes"].items():
            extra["closes"][k] = extra["closes"].get(k, 0) + v
        extra["conn_errors"] += res["conn_errors"]
        for op in args.ops:
            d = per_op.setdefault(op, {"lat": [], "items": 0, "pages": 0})
            a = array.array("d")
            a.frombytes(res["lat"][op])
            d["lat"].extend(x * 1000 for x in a)
            d["items"] += res["items"][op]
            d["pages"] += res["pages"][op]
    variants: dict[str, list[float]] = {}
    for msg in results:
        assert msg is not None
        for k, raw in msg[1]["variants"].items():
            a = array.array("d")
            a.frombytes(raw)
            variants.setdefault(k, []).extend(x * 1000 for x in a)
    variants_out = {}
    for k in sorted(variants):
        lats = sorted(variants[k])
        variants_out[k] = {
            "replies": len(lats),
            "p50_ms": _pct(lats, 50),
            "p95_ms": _pct(lats, 95),
            "p99_ms": _pct(lats, 99),
            "max_ms": lats[-1],
        }
    ops_out = {}
    for op, d in per_op.items():
        lats = sorted(d["lat"])
        n = len(lats)
        total += n
        ops_out[op] = {
            "replies": n,
            "pages_followed": d["pages"],
            "items_per_reply": round(d["items"] / n, 2) if n else None,
            "p50_ms": _pct(lats, 50),
            "p95_ms": _pct(lats, 95),
            "p99_ms": _pct(lats, 99),
            "max_ms": lats[-1] if lats else math.nan,
            "errors": {k.split(":", 1)[1]: v for k, v in errors.items() if k.split(":", 1)[0] == op},
            "p99_target_met": bool(n and _pct(lats, 99) < 10.0),
        }
    return {
        "questions": questions,
        "events": events,
        "days": days,
        "database": meta,
        "hot_questions": hot,
        "readers": len(jobs),
        "server_start_s": round(start_s, 2),
        "run_s": round(elapsed, 2),
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "server_cpu_cores": round(cpu / elapsed, 3),
        "server_cpu_us_per_request": round(cpu / total * 1e6, 1) if total else None,
        "client_cpu_cores": round(ccpu / elapsed, 3),
        "machine_busy_cores": round(busy / elapsed, 3),
        "background_cores_before": round(background, 3),
        "rss_mb": {
            "started": round(rss_started / 2**20, 1),
            "connected": round(rss_connected / 2**20, 1),
            "peak": round(rss_peak / 2**20, 1),
            "after_run": round(rss_after / 2**20, 1),
            "readers_gone": round(rss_left / 2**20, 1),
        },
        "server_alive": alive,
        "ops": ops_out,
        "variants": variants_out,
        **extra,
    }


def _print_run(r: dict[str, Any]) -> None:
    db = r["database"]
    print(
        f"\n== {r['questions']:,} questions over {r['days']:g} days, {db['events']:,} events, {db['users']:,} users, {db['answers']:,} answers"
        f" ({db['db_bytes'] / 1e6:.0f} MB, built {db['age_h']} h ago; {r['hot_questions']:,} questions in the"
        f" server's 7-day hot window)"
    )
    print(
        f"server start {r['server_start_s']} s; {r['readers']} readers, {r['requests']:,} replies in {r['run_s']} s"
        f" ({r['requests_per_s']:,.0f}/s); server CPU {r['server_cpu_cores']:.2f} cores"
        f" ({r['server_cpu_us_per_request']} us/request), clients {r['client_cpu_cores']:.2f},"
        f" machine {r['machine_busy_cores']:.2f} (background before: {r['background_cores_before']:.2f})"
    )
    rows = [
        (op, o["replies"], o["pages_followed"], o["items_per_reply"], o["p50_ms"], o["p95_ms"], o["p99_ms"],
         o["max_ms"], "yes" if o["p99_target_met"] else "NO", ", ".join(f"{k} {v}" for k, v in o["errors"].items()))
        for op, o in r["ops"].items()
    ]  # fmt: skip
    print(
        h.format_table(
            ["op", "replies", "pages", "items", "p50 ms", "p95 ms", "p99 ms", "max ms", "p99<10", "errors"], rows
        )
    )
    rows = [(k, v["replies"], v["p50_ms"], v["p95_ms"], v["p99_ms"], v["max_ms"]) for k, v in r["variants"].items()]
    if rows:
        print(h.format_table(["by kind", "replies", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows))
    rss = r["rss_mb"]
    print(
        f"server RSS MB: started {rss['started']}, readers connected {rss['connected']}, peak {rss['peak']},"
        f" after the run {rss['after_run']}, readers gone {rss['readers_gone']}"
    )
    if r["unanswered"] or r["dead"] or r["events"]:
        print(f"unanswered {r['unanswered']}, readers dropped {r['dead']} {r['closes']}, events {r['events']}")


def _parser() -> argparse.ArgumentParser:
    p = h.bench_parser(__doc__)
    p.add_argument("--questions", type=int, default=100_000, help="stored questions (default 100000)")
    p.add_argument("--users", type=int, default=10_000, help="stored users (default 10000)")
    p.add_argument(
        "--events", type=int, default=None, help="stored durable events (default 10 per question: 1,000,000)"
    )
    p.add_argument("--days", type=float, default=20.0, help="the questions span this many days (default 20)")
    p.add_argument(
        "--compare-sizes",
        action="store_true",
        help="run 10k and 100k questions over --days, and 100k over 10x --days; compare RSS",
    )
    p.add_argument("--readers", type=int, default=200, help="concurrent reader connections (default 200)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of reading (default 30)")
    p.add_argument("--max-requests", type=int, default=300_000, help="bound on requests per run (default 300000)")
    p.add_argument("--think-ms", type=float, default=1000.0, help="mean think time between requests (default 1000)")
    p.add_argument("--client-procs", type=int, default=1, help="reader processes (default 1)")
    p.add_argument(
        "--ops", type=lambda s: s.split(","), default=list(OPS), help="comma-separated operations (default the four)"
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--cache-dir", default="/tmp/dongne-bench-reads", help="where generated databases are kept")
    p.add_argument("--max-cache-age-h", type=float, default=12.0, help="rebuild a cached database older than this")
    p.add_argument("--timeout", type=float, default=1800.0, help="bound on the whole bench, seconds")
    h.add_json_option(p, "reads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.compare_sizes:
        # The third database has the 100k questions at the 10k one's rate (ten times the days): the same
        # questions in the server's 7-day hot window as the 10k one, ten times the history behind it.
        sizes = [(10_000, args.days), (100_000, args.days), (100_000, args.days * 10)]
    else:
        sizes = [(args.questions, args.days)]
    h.raise_nofile(65536)
    ctx = multiprocessing.get_context("spawn")
    secret = secrets.token_urlsafe(32)
    runs = []
    with h.time_limit(args.timeout), tempfile.TemporaryDirectory(prefix="dongne-reads-") as tmp:
        for q, days in sizes:
            events = args.events if args.events is not None else q * 10
            r = run_size(args, ctx, q, events, days, secret, Path(tmp))
            _print_run(r)
            runs.append(r)
    report = h.report_head("reads", args)
    report["runs"] = runs
    report["targets"] = {
        "p99_ms": 10.0,
        "p99_met": all(o["p99_target_met"] for r in runs for o in r["ops"].values()),
    }
    if len(runs) == 3:
        report["rss_ratios"] = ratios = {}
        print("\nserver RSS (MB) against the stored history:")
        rows = []
        for r in runs:
            rss = r["rss_mb"]
            rows.append(
                (f"{r['questions']:,} q / {r['days']:g} d", r["database"]["events"], r["hot_questions"],
                 rss["started"], rss["after_run"], rss["peak"])
            )  # fmt: skip
        print(h.format_table(["database", "events", "hot questions", "started", "after run", "peak"], rows))
        small, big, long = runs
        for name, other in (("100k_same_days_to_10k", big), ("100k_10x_days_to_10k", long)):
            ratios[name] = {k: round(other["rss_mb"][k] / small["rss_mb"][k], 3) for k in ("started", "after_run")}
        print(
            f"RSS ratio after the run: 100k/10k questions over {args.days:g} days"
            f" {ratios['100k_same_days_to_10k']['after_run']}x (hot questions {big['hot_questions']:,} vs"
            f" {small['hot_questions']:,}); 100k over {args.days * 10:g} days / 10k over {args.days:g} days (same"
            f" rate, 10x the history) {ratios['100k_10x_days_to_10k']['after_run']}x"
        )
    h.write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
