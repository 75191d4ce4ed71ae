"""Location operations over real sockets: positions, nearby, settings, analytics."""

from __future__ import annotations

import math

import pytest
import trio

from dongne.client import RequestError
from dongne.core.geo import haversine_m

from .conftest import NO_TIMERS, Harness, question_data

HALL = {"lat": 33.4996, "lng": 126.5312}
SEONGSAN = {"lat": 33.4581, "lng": 126.9425}


def east(metres: float, origin: dict[str, float] = HALL) -> dict[str, float]:
    return {"lat": origin["lat"], "lng": origin["lng"] + metres / (111320 * math.cos(math.radians(origin["lat"])))}


async def test_update_location_snaps_names_the_region_and_is_rate_limited(server: Harness) -> None:
    async with server.connect("asker") as asker:
        # The local joins the asker's question, so its leaving is announced (user_offline).
        qid = (await asker.request("create_question", question_data(location=SEONGSAN)))["question"]["question_id"]
        async with server.connect("local", local=True) as local:
            await local.request("join_question", {"question_id": qid})
            exact = {"lat": 33.499612345, "lng": 126.531298765}
            reply = await local.request("update_location", {"location": exact, "accuracy_m": 12.5})
            snapped = reply["location"]
            assert snapped != exact
            assert haversine_m(exact["lat"], exact["lng"], snapped["lat"], snapped["lng"]) <= 71
            assert (reply["region"], reply["live"]) == ("Jeju-si", True)
            assert await asker.request("nearby_locals", {"location": HALL}) == {"within_2km": 1, "within_5km": 1}

            with pytest.raises(RequestError) as limited:
                await local.request("update_location", {"location": SEONGSAN})
            assert limited.value.code == "rate_limited"
            assert 0 < limited.value.error["retry_after_ms"] <= 2000
            with pytest.raises(RequestError) as outside:
                await local.request("update_location", {"location": {"lat": 35.1796, "lng": 129.0756}})  # Busan
            assert outside.value.code == "outside_service_area"
            with pytest.raises(RequestError) as bad:
                await local.request("update_location", {"location": HALL, "accuracy_m": -1})
            assert bad.value.code == "invalid_field"
        # The last connection closed: the local left the live index.
        assert (await asker.next_event("user_offline"))["data"]["user_id"] == "local"
        assert await asker.request("nearby_locals", {"location": HALL}) == {"within_2km": 0, "within_5km": 0}


async def test_rate_limit_window_reopens(start_server, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(server=NO_TIMERS, location={"min_update_interval_s": 30.0})
    async with h.connect("local", local=True, timeout=math.inf) as local:
        await local.request("update_location", {"location": HALL})
        with pytest.raises(RequestError) as limited:
            await local.request("update_location", {"location": east(500)})
        wait_ms = limited.value.error["retry_after_ms"]
        assert 0 < wait_ms <= 30_000
        await trio.sleep(wait_ms / 1000)
        assert (await local.request("update_location", {"location": east(500)}))["region"] == "Jeju-si"
    await h.running.aclose()


async def test_nearby_questions_and_locals(server: Harness) -> None:
    async with (
        server.connect("asker") as asker,
        server.connect("walker", local=True) as walker,
        server.connect("other", local=True) as other,
    ):
        await other.request("update_location", {"location": east(1500)})
        counts = await asker.request("nearby_locals", {"location": HALL})
        assert counts == {"within_2km": 1, "within_5km": 1}

        near_q = (await asker.request("create_question", question_data(location=east(1000))))["question"]
        far_q = (await asker.request("create_question", question_data(title="far", location=SEONGSAN)))["question"]
        # Moving near the first question brings a nearby_questions event.
        await walker.request("update_location", {"location": HALL})
        event = await walker.next_event("nearby_questions")
        ids = [q["question_id"] for q in event["data"]["questions"]]
        assert ids == [near_q["question_id"]]
        assert 900 < event["data"]["questions"][0]["distance_m"] < 1100
        listed = await walker.request("nearby_questions")
        assert [q["question_id"] for q in listed["questions"]] == ids
        assert far_q["question_id"] not in ids
        # The asker does not see its own questions as "nearby".
        assert (await asker.request("nearby_questions", {"location": HALL}))["questions"] == []
        with pytest.raises(RequestError) as unknown:
            await asker.request("nearby_questions")
        assert unknown.value.code == "invalid_field"
        counts = await asker.request("nearby_locals", {"location": HALL})
        assert counts == {"within_2km": 2, "within_5km": 2}


async def test_settings_round_trip_and_validation(server: Harness) -> None:
    async with server.connect("local", local=True) as local:
        defaults = (await local.request("get_settings"))["settings"]
        assert defaults == {"immediate_alerts": True, "quiet_hours": None, "max_alerts_per_hour": 20, "home": None}
        updated = await local.request(
            "update_settings",
            {"immediate_alerts": False, "quiet_hours": [22, 7], "max_alerts_per_hour": 5, "home": HALL},
        )
        assert updated["settings"] == {
            "immediate_alerts": False,
            "quiet_hours": [22, 7],
            "max_alerts_per_hour": 5,
            "home": HALL,
        }
        for bad in ({"quiet_hours": [25, 7]}, {"max_alerts_per_hour": -1}, {"immediate_alerts": "yes"}):
            with pytest.raises(RequestError) as refused:
                await local.request("update_settings", bad)
            assert refused.value.code == "invalid_field"
        with pytest.raises(RequestError) as outside:
            await local.request("update_settings", {"home": {"lat": 37.5, "lng": 127.0}})
        assert outside.value.code == "outside_service_area"
    await server.running.aclose()


async def test_trending_and_admin_hotspots(server: Harness) -> None:
    async with server.connect("asker") as asker, server.connect("boss", admin=True) as boss:
        await asker.request(
            "create_question", question_data(location=east(200, SEONGSAN), hashtags=["sunrise", "hiking"])
        )
        await asker.request(
            "create_question", question_data(title="again", location=east(300, SEONGSAN), hashtags=["sunrise"])
        )
        trending = await asker.request("trending", {"region": "Seongsan"})
        assert trending["region"] == "Seongsan"
        assert (await asker.request("trending", {"region": "Udo"}))["windows"]["1d"] == []
        assert trending["windows"]["15m"][:2] == [["sunrise", 2], ["hiking", 1]]
        with pytest.raises(RequestError) as forbidden:
            await asker.request("hotspots")
        assert forbidden.value.code == "forbidden"
        spots = await boss.request("hotspots")
        top = spots["hotspots"][0]
        assert (top["region"], top["questions"], top["askers"]) == ("Seongsan", 2, 1)
        assert "Seongsan" in top["name"] or "Ilchul" in top["name"]
        assert spots["regions"][0]["region"] == "Seongsan"
        assert spots["regions"][0]["ratio"] is None  # open questions and no local online there


@pytest.mark.backends("sqlite", "postgres")
async def test_trending_and_hotspots_count_what_was_asked_across_restarts_and_moderation(start_server) -> None:  # type: ignore[no-untyped-def]
    """A closed question still counts after a restart (it was asked within the windows); a deleted or hidden
    one stops counting at once; an unhidden one counts again, once."""

    async def seen(h: Harness) -> tuple[list[list[object]], tuple[int, int]]:
        async with h.connect("reader") as reader, h.connect("boss", admin=True) as boss:
            trending = (await reader.request("trending", {"region": "Seongsan"}))["windows"]["15m"]
            spot = (await boss.request("hotspots"))["hotspots"]
            return trending, ((spot[0]["questions"], spot[0]["open"]) if spot else (0, 0))

    h = await start_server()
    async with h.connect("asker") as asker, h.connect("other") as other:
        ids = {}
        for who, tags in ((asker, ["sunrise", "hiking"]), (asker, ["sunrise"]), (other, ["sunrise", "spam"])):
            data = question_data(title=f"about {tags}", location=east(200, SEONGSAN), hashtags=tags)
            ids[tags[-1]] = (await who.request("create_question", data))["question"]["question_id"]
        await asker.request("close_question", {"question_id": ids["hiking"]})
        assert await seen(h) == ([["sunrise", 3], ["hiking", 1], ["spam", 1]], (3, 2))
    await h.running.aclose()

    h = await start_server()
    assert await seen(h) == ([["sunrise", 3], ["hiking", 1], ["spam", 1]], (3, 2))  # the closed one too
    async with h.connect("boss", admin=True) as boss, h.connect("asker") as asker:
        await boss.request("hide_question", {"id": ids["spam"], "reason": "spam"})
        assert await seen(h) == ([["sunrise", 2], ["hiking", 1]], (2, 1))
        await asker.request("delete_question", {"question_id": ids["hiking"]})
        assert await seen(h) == ([["sunrise", 1]], (1, 1))
        await boss.request("unhide_question", {"id": ids["spam"]})
        assert await seen(h) == ([["sunrise", 2], ["spam", 1]], (2, 2))
        await boss.request("unhide_question", {"id": ids["spam"]})  # nothing to change: counted once still
        assert await seen(h) == ([["sunrise", 2], ["spam", 1]], (2, 2))
    await h.running.aclose()

    h = await start_server()
    assert await seen(h) == ([["sunrise", 2], ["spam", 1]], (2, 2))
    await h.running.aclose()
