"""Region data and lookup: the bundled Jeju regions and RegionSet itself."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import shapely
from hypothesis import given
from hypothesis import strategies as st
from shapely.geometry import Polygon

from dongne.core.regions import (
    Bounds,
    Hotspot,
    RegionFileError,
    RegionSet,
    load_default_regions,
    load_hotspots,
    parse_hotspots,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FACTS_PATH = REPO_ROOT / ".." / "shared" / "data" / "jeju_facts.json"
DATA_DIR = REPO_ROOT / "dongne" / "data"

# Square metres per square degree near Jeju, as in tools/derive_regions.py.
M2_PER_DEG2 = math.cos(math.radians(33.38)) * 111_320.0 * 110_540.0

# Hotspots whose Voronoi region differs from the KOSTAT unit the facts file
# records for them: name_ko -> (KOSTAT unit, our region). Voronoi cells of
# office points only approximate real borders; these are the known cases, on
# the slopes of Hallasan and inland Aewol where offices are far away.
KNOWN_VORONOI_MISMATCHES = {
    "한라산 성판악 탐방안내소": ("조천읍", "Namwon"),
    "한라산 영실 탐방로 입구": ("중문동", "Seogwipo"),
    "새별오름": ("애월읍", "Hallim"),
}


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    if not FACTS_PATH.exists():
        pytest.skip(f"facts file not found at {FACTS_PATH}")
    data: dict[str, Any] = json.loads(FACTS_PATH.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def regions() -> RegionSet:
    return load_default_regions()


def name_by_ko(regions: RegionSet) -> dict[str, str]:
    """Map each bundled feature's ``name_ko`` to its short ``name``."""
    return {f["properties"]["name_ko"]: f["properties"]["name"] for f in regions.to_geojson()["features"]}


def square(name: str, west: float, south: float, size: float = 1.0) -> dict[str, Any]:
    ring = [[west, south], [west + size, south], [west + size, south + size], [west, south + size], [west, south]]
    return {
        "type": "Feature",
        "properties": {"name": name},
        "geometry": {"type": "Polygon", "coordinates": [ring]},
    }


def collection(*features: Any) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


# --- the bundled Jeju data ---------------------------------------------------


def test_default_regions_are_the_15_divisions(regions: RegionSet) -> None:
    """One region per division, with the documented short ids."""
    expected = {
        "Jeju-si",
        "Aewol",
        "Hallim",
        "Hangyeong",
        "Jocheon",
        "Gujwa",
        "Udo",
        "Chuja",
        "Seogwipo",
        "Jungmun",
        "Namwon",
        "Pyoseon",
        "Seongsan",
        "Andeok",
        "Daejeong",
    }

    assert expected == set(regions.names)
    assert len(regions) == 15


def test_every_facts_hotspot_is_in_a_region(regions: RegionSet, facts: dict[str, Any]) -> None:
    """All 30 hotspots of the facts file land in some region."""
    outside = [h["name_en"] for h in facts["hotspots"] if regions.region_of(h["lat"], h["lng"]) is None]

    assert len(facts["hotspots"]) == 30
    assert outside == []


def test_hotspots_match_facts_kostat_units(regions: RegionSet, facts: dict[str, Any]) -> None:
    """Hotspots fall in the division the facts' KOSTAT check names, bar known cases.

    The facts record a KOSTAT eup/myeon/dong unit per hotspot. An eup/myeon
    (or 중문동) unit names one of our divisions; any other dong unit must be in
    one of the city "dong-area" divisions.
    """
    by_ko = name_by_ko(regions)
    dong_areas = {by_ko[d["name_ko"]] for d in facts["divisions"] if d["kind"] == "dong-area"}
    unit_of = {c["name"]: c["kostat_unit"] for c in facts["notes"]["checks"]["hotspots"]}
    mismatches = {}
    for h in facts["hotspots"]:
        unit = unit_of[h["name_ko"]]
        got = regions.region_of(h["lat"], h["lng"])
        allowed = {by_ko[unit]} if unit in by_ko else dong_areas
        assert unit in by_ko or unit.endswith("동"), unit
        if got not in allowed:
            mismatches[h["name_ko"]] = (unit, got)

    assert len(unit_of) == 30
    assert mismatches == KNOWN_VORONOI_MISMATCHES


def test_bundled_hotspots_agree_with_lookup(regions: RegionSet, facts: dict[str, Any]) -> None:
    """The bundled hotspot tags are what region_of says, for the facts' places."""
    hotspots = load_hotspots()

    assert [h["name_en"] for h in facts["hotspots"]] == [h.name for h in hotspots]
    assert [h["name_ko"] for h in facts["hotspots"]] == [h.name_ko for h in hotspots]
    for h in hotspots:
        assert isinstance(h, Hotspot)
        assert regions.region_of(h.lat, h.lng) == h.region, h.name
    assert next(h.region for h in hotspots if h.name == "Udo Island") == "Udo"
    assert next(h.region for h in hotspots if h.name == "Seopjikoji") == "Seongsan"


def test_each_office_is_in_its_own_region(regions: RegionSet, facts: dict[str, Any]) -> None:
    """Every division office point is inside its own division."""
    by_ko = name_by_ko(regions)
    got = {d["name_ko"]: regions.region_of(d["lat"], d["lng"]) for d in facts["divisions"]}

    assert len(got) == 15
    assert by_ko == got


@pytest.mark.parametrize(
    ("lat", "lng"),
    [
        (33.0, 126.0),  # open sea south-west of Jeju
        (34.5, 127.5),  # near the mainland coast, far outside Jeju
        (33.75, 126.5),  # Jeju Strait, between the main island and Chuja
        (33.11, 126.27),  # Marado, outside the bundled coastline
        (0.0, 0.0),
        (float("nan"), 126.5),
        (33.4, float("inf")),
    ],
)
def test_points_off_jeju_are_in_no_region(regions: RegionSet, lat: float, lng: float) -> None:
    assert regions.region_of(lat, lng) is None


def test_regions_do_not_overlap(regions: RegionSet) -> None:
    """Pairwise intersections of the bundled regions have no area."""
    worst = max(
        regions.geometry(a).intersection(regions.geometry(b)).area * M2_PER_DEG2
        for a, b in itertools.combinations(regions.names, 2)
    )

    assert worst < 1.0  # square metres


def test_regions_cover_all_land(regions: RegionSet, facts: dict[str, Any]) -> None:
    """Every coastline ring lies inside the union of the regions (no gaps on land)."""
    union = shapely.union_all([regions.geometry(n) for n in regions.names])

    for key, ring in facts["coastline"].items():
        assert union.contains(Polygon(ring)), key


@pytest.mark.parametrize(("name", "ring"), [("Udo", "udo"), ("Chuja", "chuja")])
def test_islet_regions_contain_their_rings(regions: RegionSet, facts: dict[str, Any], name: str, ring: str) -> None:
    """Udo and Chuja each cover their whole island, with margin to spare."""
    island = Polygon(facts["coastline"][ring])

    assert regions.geometry(name).contains(island)
    assert regions.geometry(name).area > island.area


def test_main_island_cells_stay_off_the_islets(regions: RegionSet, facts: dict[str, Any]) -> None:
    """No main-island region reaches Udo or Chuja."""
    islets = [Polygon(facts["coastline"][k]) for k in ("udo", "chuja")]

    for name in set(regions.names) - {"Udo", "Chuja"}:
        for islet in islets:
            assert not regions.geometry(name).intersects(islet), name


def test_default_bounds(regions: RegionSet) -> None:
    """The bounds run from south of Jeju's tip to north of Chuja."""
    b = regions.bounds

    assert 33.1 < b.min_lat < 33.2 and 33.95 < b.max_lat < 34.0
    assert 126.1 < b.min_lng < 126.2 and 126.95 < b.max_lng < 127.0


def test_default_geojson_is_rfc7946_shaped(regions: RegionSet) -> None:
    """Served GeoJSON keeps credits, [lng, lat] order, 5 decimals and CCW shells."""
    doc = regions.to_geojson()

    assert doc["generated_by"] == "tools/derive_regions.py"
    assert doc["sources"] and all(isinstance(s, str) for s in doc["sources"])
    for feature in doc["features"]:
        assert {"name", "name_ko", "name_en"} == set(feature["properties"])
        coords = shapely.get_coordinates(shapely.geometry.shape(feature["geometry"]))
        assert (coords[:, 0] > 126).all() and (coords[:, 1] < 34).all()
        assert (abs(coords * 1e5 - (coords * 1e5).round()) < 1e-6).all()
    for name in regions.names:
        geom = regions.geometry(name)
        for poly in getattr(geom, "geoms", [geom]):
            assert poly.exterior.is_ccw, name


def test_derivation_reproduces_bundled_files(tmp_path: Path, facts: dict[str, Any]) -> None:
    """Rerunning tools/derive_regions.py gives the committed files byte for byte."""
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "derive_regions.py"),
            "--facts",
            str(FACTS_PATH),
            "--out-dir",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )

    for name in ("jeju_regions.geojson", "jeju_hotspots.json"):
        assert (DATA_DIR / name).read_bytes() == (tmp_path / name).read_bytes(), name


# --- RegionSet on custom data ------------------------------------------------


def test_two_squares_from_file(tmp_path: Path) -> None:
    """A hand-made two-square file: lookups, lat/lng order, borders, bounds."""
    path = tmp_path / "squares.geojson"
    doc = collection(square("west", 10.0, 50.0), square("east", 11.0, 50.0))
    path.write_text(json.dumps(doc), encoding="utf-8")
    rs = RegionSet.from_file(path)

    assert rs.names == ("west", "east")
    assert rs.region_of(50.5, 10.5) == "west"
    assert rs.region_of(50.5, 11.5) == "east"
    assert rs.region_of(10.5, 50.5) is None  # swapped order is far away
    assert rs.region_of(52.0, 10.5) is None
    assert rs.region_of(50.5, 11.0) == "west"  # shared border: first in file
    assert rs.region_of(50.0, 10.0) == "west"  # outer corner counts as inside
    assert Bounds(min_lat=50.0, min_lng=10.0, max_lat=51.0, max_lng=12.0) == rs.bounds
    assert doc == rs.to_geojson()


def test_border_goes_to_first_feature_in_file() -> None:
    """Reversing the file order flips who owns the shared border, nothing else."""
    rs = RegionSet.from_geojson(collection(square("east", 11.0, 50.0), square("west", 10.0, 50.0)))

    assert rs.region_of(50.5, 11.0) == "east"
    assert rs.region_of(50.5, 10.999) == "west"


def test_multipolygon_and_geometry_lookup() -> None:
    """A MultiPolygon region answers for both parts; geometry() finds it by name."""
    a = square("x", 0.0, 0.0)["geometry"]["coordinates"]
    b = square("x", 5.0, 5.0)["geometry"]["coordinates"]
    feature = {
        "type": "Feature",
        "properties": {"name": "two-part", "extra": 1},
        "geometry": {"type": "MultiPolygon", "coordinates": [a, b]},
    }
    rs = RegionSet.from_geojson(collection(feature))

    assert rs.region_of(0.5, 0.5) == "two-part"
    assert rs.region_of(5.5, 5.5) == "two-part"
    assert rs.region_of(3.0, 3.0) is None
    assert rs.geometry("two-part").area == 2.0
    with pytest.raises(KeyError):
        rs.geometry("nope")


def test_to_geojson_returns_an_independent_copy() -> None:
    """Mutating the input or the output does not change the set."""
    doc = collection(square("a", 0.0, 0.0))
    rs = RegionSet.from_geojson(doc)
    doc["features"][0]["properties"]["name"] = "changed"
    rs.to_geojson()["features"].clear()

    assert rs.to_geojson()["features"][0]["properties"]["name"] == "a"


@given(
    lat=st.floats(min_value=49.5, max_value=51.5),
    lng=st.floats(min_value=9.5, max_value=12.5),
)
def test_region_of_matches_brute_force(lat: float, lng: float) -> None:
    """The indexed lookup equals 'first region in file order covering the point'."""
    rs = RegionSet.from_geojson(collection(square("a", 10.0, 50.0), square("b", 11.0, 50.0), square("c", 10.5, 50.5)))
    expected = next((n for n in rs.names if rs.geometry(n).covers(shapely.Point(lng, lat))), None)

    assert expected == rs.region_of(lat, lng)


# --- malformed files ---------------------------------------------------------

POINT = {"type": "Point", "coordinates": [0, 0]}
BOWTIE = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}


def with_geometry(geometry: Any, name: str = "a") -> dict[str, Any]:
    return {"type": "Feature", "properties": {"name": name}, "geometry": geometry}


MALFORMED: list[tuple[str, bytes | Any, str]] = [
    ("json-syntax", b'{"type": "FeatureCollection", "features": [', "not valid JSON"),
    ("not-utf8", b"\xff\xfe\x00{", "not UTF-8"),
    ("top-level-list", [], "not a GeoJSON FeatureCollection (found 'list')"),
    ("a-feature", square("a", 0, 0), "not a GeoJSON FeatureCollection (found 'Feature')"),
    ("no-features-key", {"type": "FeatureCollection"}, "has no features"),
    ("empty-features", collection(), "has no features"),
    ("feature-not-object", collection(square("a", 0, 0), 7), "feature 1: not a GeoJSON Feature"),
    (
        "missing-name",
        collection(square("a", 0, 0), {**square("b", 1, 0), "properties": {}}),
        "feature 1: missing a non-empty string 'name' property",
    ),
    (
        "null-properties",
        collection({**square("b", 1, 0), "properties": None}),
        "feature 0: missing a non-empty string 'name'",
    ),
    (
        "numeric-name",
        collection({**square("b", 1, 0), "properties": {"name": 3}}),
        "feature 0: missing a non-empty string 'name'",
    ),
    (
        "point-geometry",
        collection(with_geometry(POINT)),
        "feature 0: geometry must be a Polygon or MultiPolygon, got 'Point'",
    ),
    (
        "null-geometry",
        collection(with_geometry(None)),
        "feature 0: geometry must be a Polygon or MultiPolygon, got None",
    ),
    (
        "ragged-coordinates",
        collection(with_geometry({"type": "Polygon", "coordinates": [[[0, 0], [1]]]})),
        "feature 0: bad Polygon coordinates",
    ),
    (
        "string-coordinates",
        collection(with_geometry({"type": "Polygon", "coordinates": "x"})),
        "feature 0: bad Polygon coordinates",
    ),
    ("empty-polygon", collection(with_geometry({"type": "Polygon", "coordinates": []})), "feature 0: empty Polygon"),
    ("out-of-range", collection(with_geometry(square("a", 100, 170)["geometry"])), "feature 0: coordinates outside"),
    (
        "self-intersecting",
        collection(square("a", 5, 5), with_geometry(BOWTIE, "b")),
        "feature 1: invalid Polygon: Self-intersection",
    ),
    (
        "duplicate-name",
        collection(square("a", 0, 0), square("b", 1, 0), square("a", 2, 0)),
        "feature 2: duplicate name 'a' (first used by feature 0)",
    ),
]


@pytest.mark.parametrize(("content", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_file_is_rejected(tmp_path: Path, content: Any, message: str) -> None:
    """Each problem raises RegionFileError naming the file and what is wrong."""
    path = tmp_path / "bad.geojson"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())

    with pytest.raises(RegionFileError) as info:
        RegionSet.from_file(path)

    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_in_memory_errors_name_a_placeholder_source() -> None:
    with pytest.raises(RegionFileError, match=r"^<geojson>: feature 0: missing"):
        RegionSet.from_geojson(collection({"type": "Feature", "geometry": BOWTIE}))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "missing a 'hotspots' list"),
        (
            {"hotspots": [{"name": "x", "region": "r", "lat": "33", "lng": 126}]},
            "hotspot 0 needs finite numeric 'lat' and 'lng'",
        ),
        ({"hotspots": [{"name": "x", "lat": 33, "lng": 126}]}, "hotspot 0 needs string 'name' and 'region'"),
    ],
)
def test_malformed_hotspots_are_rejected(doc: Any, message: str) -> None:
    with pytest.raises(RegionFileError, match=f"^hot.json: {message}"):
        parse_hotspots(json.dumps(doc), source="hot.json")


def test_parse_hotspots_keeps_optional_korean_name() -> None:
    doc = {"hotspots": [{"name": "A", "lat": 33, "lng": 126.5, "region": "R"}]}

    assert [Hotspot(name="A", lat=33.0, lng=126.5, region="R")] == parse_hotspots(json.dumps(doc))


def _brute_region(rs: RegionSet, lat: float, lng: float) -> str | None:
    return next((n for n in rs.names if rs.geometry(n).covers(shapely.Point(lng, lat))), None)


def test_cached_lookups_match_brute_force_on_the_bundled_regions() -> None:
    """Lookups answered from the per-cell cache (second pass) equal the exact test, at cell edges and borders too."""
    rs = load_default_regions()
    b = rs.bounds
    points = [
        (b.min_lat + (b.max_lat - b.min_lat) * i / 57.3, b.min_lng + (b.max_lng - b.min_lng) * j / 61.7)
        for i in range(58)
        for j in range(62)
    ]
    # On the grid's lines (k / 200 degrees) and a hair either side.
    points += [(6680 / 200 + d, 126.53 + e) for d in (-1e-12, 0.0, 1e-12) for e in (0.0, 0.001, 0.0025)]
    points += [(33.4996 + e, 25306 / 200 + d) for d in (-1e-12, 0.0, 1e-12) for e in (0.0, 0.001, 0.0025)]
    # Along a line that crosses several borders, every ~10 m.
    points += [(33.45 + k * 0.0001, 126.40 + k * 0.0002) for k in range(800)]
    expected = [_brute_region(rs, lat, lng) for lat, lng in points]

    assert expected == [rs.region_of(lat, lng) for lat, lng in points]  # cells judged
    assert expected == [rs.region_of(lat, lng) for lat, lng in points]  # cells remembered
    assert len({e for e in expected if e is not None}) >= 10


SHARED_SQUARES = RegionSet.from_geojson(
    collection(square("a", 10.0, 50.0), square("b", 11.0, 50.0), square("c", 10.5, 50.5, 0.0123))
)


@given(
    lat=st.one_of(st.floats(min_value=49.99, max_value=50.52), st.integers(9990, 10110).map(lambda k: k / 200)),
    lng=st.one_of(st.floats(min_value=9.99, max_value=11.02), st.integers(1998, 2204).map(lambda k: k / 200)),
)
def test_cached_lookups_match_brute_force_where_borders_lie_on_cell_edges(lat: float, lng: float) -> None:
    """One set across examples, so later ones are answered by cells judged earlier; borders on the grid's lines."""
    expected = _brute_region(SHARED_SQUARES, lat, lng)

    assert expected == SHARED_SQUARES.region_of(lat, lng)
    assert expected == SHARED_SQUARES.region_of(lat, lng)
