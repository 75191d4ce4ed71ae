"""``dongne demo``: the server on a temporary database, with simulated people.

Locals walk around Jeju's hotspots sharing their position; travellers ask
questions where they stand; locals answer the alerts they receive after a
human-like pause; askers accept some answers. A newcomer opening the printed
dashboard URL sees escalation, answers, SLOs and alerts move within seconds;
the two printed app links let them ask and answer among the simulated people.
Everything talks to the server over real WebSockets through ``dongne.client``.
"""

from __future__ import annotations

import contextlib
import math
import random
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from .app import Running, run_server
from .auth import mint_signin_code, mint_token
from .client import DongneClient, RequestError, open_client
from .config import Settings, load_settings
from .core.geo import offset_position
from .core.regions import Hotspot, load_default_regions, load_hotspots

__all__ = ["run_demo"]

QUESTIONS: dict[str, list[str]] = {
    "food": [
        "Where can I get black pork (heukdwaeji) near here?",
        "Any good gogi-guksu open now?",
        "Best place for abalone porridge nearby?",
    ],
    "cafe": ["A quiet cafe with an ocean view around here?", "Where do locals get hallabong juice?"],
    "bus": [
        "Which bus goes to the airport from here?",
        "Is there a late bus back to Jeju City?",
        "How often does the 201 run?",
    ],
    "beach": ["Is the water OK for swimming today?", "Where can I rent a snorkel nearby?"],
    "hiking": [
        "Is the trail open this afternoon?",
        "How long to the crater from the parking lot?",
        "Is it too windy to climb today?",
    ],
    "weather": ["Is it going to rain in the next hour?", "Is the ferry running in this wind?"],
}
ANSWERS = [
    "Yes, try the place right behind the bus stop, open until 10.",
    "Take the 201 from the stop across the road, every 20 minutes.",
    "It's fine today, the wind dropped after noon.",
    "Ask at the small shop by the harbour, they rent gear.",
    "Locals go to the market two streets east, much cheaper.",
    "About 40 minutes at an easy pace, bring water.",
    "The ferry runs, but check the 3 pm sailing at the terminal.",
]


def _near(spot: Hotspot, rng: random.Random, radius_m: float) -> dict[str, float]:
    """A uniformly random point within ``radius_m`` of ``spot``, as a location map."""
    r = radius_m * math.sqrt(rng.random())
    theta = rng.random() * 2 * math.pi
    lat, lng = offset_position(spot.lat, spot.lng, r * math.cos(theta), r * math.sin(theta))
    return {"lat": lat, "lng": lng}


def demo_settings(db: Path, port: int, ops_port: int, secret: str) -> Settings:
    return load_settings(
        None,
        environ={},
        overrides={
            "server": {"port": port, "ops_port": ops_port},
            "store": {"path": str(db), "synchronous": "NORMAL"},
            "auth": {"jwt_secret": secret},
            # Alerts after 90 s instead of 10 minutes, so the dashboard shows some.
            "alerts": {"slow_response_s": 90.0},
            "snapshots": {"interval_s": 0.0},
        },
    )


class Demo:
    def __init__(self, running: Running, secret: str, rng: random.Random) -> None:
        self.running = running
        self.secret = secret
        self.rng = rng
        # demo_settings names no regions file, so the server serves the bundled ones.
        regions = load_default_regions()
        self.spots = [s for s in load_hotspots() if regions.region_of(s.lat, s.lng) is not None]
        self.url = f"ws://127.0.0.1:{running.port}"
        self.asked = 0
        self.answered = 0

    def token(self, user_id: str, **claims: Any) -> str:
        return mint_token(self.secret, user_id, now_s=time.time(), **claims)

    async def local(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        tags = rng.sample(sorted(QUESTIONS), 2)
        spot = rng.choice(self.spots)
        nick = rng.choice(["Jun", "Mira", "Seo", "Hana", "Tae", "Yuna", "Min", "Ara"]) + str(i)
        async with open_client(self.url, self.token(f"local{i}", nick=nick, local=True, tags=tags), timeout=30) as me:
            with contextlib.suppress(RequestError):  # the random point fell in the sea: no home then
                await me.request("update_settings", {"home": _near(spot, rng, 1500)})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wander, me, spot, rng)
                while True:
                    alert = await me.next_event("new_question_notification", timeout=math.inf)
                    if rng.random() < 0.6:
                        nursery.start_soon(self._answer_later, me, alert["data"]["question_id"], rng)

    async def _wander(self, me: DongneClient, spot: Hotspot, rng: random.Random) -> None:
        while True:
            if rng.random() < 0.1:
                spot = rng.choice(self.spots)
            with contextlib.suppress(RequestError):  # a point in the sea is refused: the next move is another
                await me.request("update_location", {"location": _near(spot, rng, 2000)})
            await trio.sleep(rng.uniform(5, 15))

    async def _answer_later(self, me: DongneClient, question_id: str, rng: random.Random) -> None:
        await trio.sleep(rng.uniform(2, 45))
        try:
            await me.request("create_answer", {"question_id": question_id, "content": rng.choice(ANSWERS)})
            self.answered += 1
        except RequestError:
            pass  # accepted or closed meanwhile

    async def traveller(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        async with open_client(self.url, self.token(f"traveller{i}", nick=f"Traveller {i}"), timeout=30) as me:
            await trio.sleep(rng.uniform(0, 10))
            while True:
                tag = rng.choice(sorted(QUESTIONS))
                spot = rng.choice(self.spots)
                try:
                    q = (
                        await me.request(
                            "create_question",
                            {
                                "title": rng.choice(QUESTIONS[tag]),
                                "location": _near(spot, rng, 800),
                                "hashtags": [tag],
                                "urgency": "urgent" if rng.random() < 0.1 else "normal",
                            },
                        )
                    )["question"]
                    self.asked += 1
                except RequestError:
                    await trio.sleep(30)
                    continue
                with trio.move_on_after(rng.uniform(30, 90)):
                    note = await me.next_event("answer_notification", timeout=math.inf)
                    if rng.random() < 0.7:
                        await trio.sleep(rng.uniform(1, 10))
                        with contextlib.suppress(RequestError):  # closed meanwhile
                            await me.request(
                                "accept_answer",
                                {"question_id": q["question_id"], "answer_id": note["data"]["answer"]["answer_id"]},
                            )
                await me.request("leave_question", {"question_id": q["question_id"]})
                await trio.sleep(rng.uniform(10, 40))


async def _keep_alive(person: Any, i: int) -> None:
    """Run one simulated person; if its connection drops, reconnect like an app would."""
    while True:
        try:
            await person(i)
        except (
            trio_websocket.ConnectionClosed,
            trio_websocket.HandshakeError,
            OSError,
            RequestError,
            trio.TooSlowError,
        ):
            await trio.sleep(2)


async def run_demo(*, port: int = 8765, ops_port: int = 8766, locals_count: int = 40, travellers: int = 12,
                   duration_s: float | None = None, seed: int | None = None, quiet: bool = False) -> None:  # fmt: skip
    """Run the demo until interrupted (or for ``duration_s``)."""
    rng = random.Random(seed)
    secret = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="dongne-demo-") as tmp:
        settings = demo_settings(Path(tmp) / "demo.sqlite3", port, ops_port, secret)
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(
                lambda task_status: run_server(settings, handle_signals=True, task_status=task_status)
            )
            demo = Demo(running, secret, rng)
            # A one-time sign-in link (works once, within 5 minutes): no admin token in browser history.
            code = mint_signin_code(secret, "demo-admin", nick="Operator", now_s=time.time())
            app = f"http://127.0.0.1:{running.port}/#token="
            # Play both sides among the simulated people: open each link in its own tab
            # (or browser profile: a tab keeps the token it was opened with).
            traveller = demo.token("you-traveller", nick="You (traveller)")
            local = demo.token("you-local", nick="You (local)", local=True, tags=["food", "bus"])
            print(
                "\ndongne demo is running with simulated locals and travellers around Jeju.\n"
                f"  Traveller: {app}{traveller}\n"
                f"  Local:     {app}{local}\n"
                f"  Dashboard: http://127.0.0.1:{running.ops_port}/admin/login?code={code}"
                "  (works once, within 5 minutes)\n"
                f"  Clients:   ws://127.0.0.1:{running.port}  (see PROTOCOL.md)\n"
                "  Stop with Ctrl-C.\n",
                flush=True,
            )
            async with trio.open_nursery() as people:
                for i in range(locals_count):
                    people.start_soon(_keep_alive, demo.local, i)
                for i in range(travellers):
                    people.start_soon(_keep_alive, demo.traveller, i)
                # Until Ctrl-C / SIGTERM (which start the server's shutdown) or the duration.
                with trio.move_on_after(math.inf if duration_s is None else duration_s):
                    await running.wait_shutdown()
                if not quiet:
                    print(f"demo: {demo.asked} questions asked, {demo.answered} answers", flush=True)
                people.cancel_scope.cancel()
                running.stop()
