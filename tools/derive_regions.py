"""Derive dongne's bundled Jeju region data from the curated facts file.

Theory of operation: Jeju's 15 administrative divisions (the two city "dong"
areas and 13 eup/myeon) have no simple public polygons we can redistribute
cleanly, so each division is approximated by the Voronoi cell of its office
point, clipped to the coastline grown by :data:`COAST_BUFFER_M` metres so that
beaches, breakwaters and headlands just outside the simplified coastline still
fall inside a region. The outlying islands are handled on their own: Udo and
Chuja are simply their own buffered rings, and the 13 main-island cells are
clipped to the main island's buffered polygon minus those two, so no main-island
cell can swallow an islet.

All geometry is done in a local equirectangular projection (metres) centred on
:data:`LAT0`; at Jeju's size its distortion is far below the coastline's own
0.9 km simplification error.

Usage::

    python tools/derive_regions.py [--facts PATH] [--out-dir DIR]

The output is deterministic: rerunning it on the same facts file reproduces the
committed files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPoint, Point, Polygon, mapping
from shapely.geometry.base import BaseGeometry
from shapely.ops import voronoi_diagram

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FACTS = REPO_ROOT / ".." / "shared" / "data" / "jeju_facts.json"
DEFAULT_OUT_DIR = REPO_ROOT / "dongne" / "data"
REGIONS_FILE = "jeju_regions.geojson"
HOTSPOTS_FILE = "jeju_hotspots.json"
GENERATED_BY = "tools/derive_regions.py"

#: Projection centre latitude and metres per degree (equirectangular).
LAT0 = 33.38
M_PER_DEG_LAT = 110_540.0
M_PER_DEG_LNG = math.cos(math.radians(LAT0)) * 111_320.0

#: How far beyond the simplified coastline a region reaches.
COAST_BUFFER_M = 1_000.0
#: Segments per quarter circle for the buffer's rounded corners.
BUFFER_QUAD_SEGS = 4
#: Output decimals in degrees (5 decimals is about 1 m).
DECIMALS = 5
#: Distance under which a vertex counts as lying on a neighbour's edge.
NODING_TOLERANCE_M = 0.01

#: Stable short ids, keyed by the facts file's Korean division names.
SHORT_NAMES: dict[str, str] = {
    "제주시 동지역": "Jeju-si",
    "애월읍": "Aewol",
    "한림읍": "Hallim",
    "한경면": "Hangyeong",
    "조천읍": "Jocheon",
    "구좌읍": "Gujwa",
    "우도면": "Udo",
    "추자면": "Chuja",
    "서귀포시 동지역": "Seogwipo",
    "중문동": "Jungmun",
    "남원읍": "Namwon",
    "표선면": "Pyoseon",
    "성산읍": "Seongsan",
    "안덕면": "Andeok",
    "대정읍": "Daejeong",
}
#: Divisions that are whole islets of their own, mapped to their coastline ring.
ISLAND_RINGS: dict[str, str] = {"Udo": "udo", "Chuja": "chuja"}
MAIN_RING = "main"


class FactsError(ValueError):
    """The facts file does not have the shape this script expects."""


def to_metres(geom: BaseGeometry) -> BaseGeometry:
    """Project a lng/lat geometry into local metres.

    Args:
        geom: Geometry in WGS84 ``(lng, lat)`` order.

    Returns:
        The same geometry in the local equirectangular frame.
    """
    return shapely.transform(geom, lambda c: c * (M_PER_DEG_LNG, M_PER_DEG_LAT))


def to_degrees(geom: BaseGeometry) -> BaseGeometry:
    """Invert :func:`to_metres`.

    Args:
        geom: Geometry in local metres.

    Returns:
        The same geometry in WGS84 ``(lng, lat)`` order.
    """
    return shapely.transform(geom, lambda c: c / (M_PER_DEG_LNG, M_PER_DEG_LAT))


def buffered_ring(ring: Sequence[Sequence[float]]) -> BaseGeometry:
    """Grow one coastline ring by :data:`COAST_BUFFER_M`.

    Args:
        ring: Closed ``[lng, lat]`` ring from the facts file.

    Returns:
        The buffered polygon, in local metres.
    """
    poly = to_metres(Polygon([(float(x), float(y)) for x, y in ring]))
    return poly.buffer(COAST_BUFFER_M, quad_segs=BUFFER_QUAD_SEGS)


def voronoi_cells(points: Sequence[tuple[float, float]], clip: BaseGeometry) -> list[BaseGeometry]:
    """Voronoi cells of ``points`` clipped to ``clip``, in input order.

    Args:
        points: Generator points, in the same frame as ``clip``.
        clip: Area the cells must cover.

    Returns:
        One clipped cell per point, ``result[i]`` containing ``points[i]``.

    Raises:
        FactsError: A point lies outside ``clip`` or shares a cell.
    """
    diagram = voronoi_diagram(MultiPoint(points), envelope=clip.envelope)
    # GEOS does not promise the cells come back in input order, so match each
    # cell to the generator point it contains.
    cells: list[BaseGeometry | None] = [None] * len(points)
    for cell in diagram.geoms:
        owners = [i for i, p in enumerate(points) if cell.covers(Point(p))]
        if len(owners) != 1:
            raise FactsError(f"Voronoi cell holds {len(owners)} office points")
        cells[owners[0]] = cell.intersection(clip)
    if any(c is None for c in cells):
        raise FactsError("duplicate division office points")
    return [c for c in cells if c is not None]


def to_output(geom: BaseGeometry) -> BaseGeometry:
    """Back to degrees, rounded to :data:`DECIMALS` and oriented per RFC 7946.

    Plain rounding (not snap-rounding) keeps borders shared by two regions
    identical in both, as long as both carry the same vertices; see
    :func:`derive_regions`.

    Args:
        geom: Polygonal geometry in local metres.

    Returns:
        A valid polygonal geometry with rounded vertices.

    Raises:
        FactsError: Rounding left something that is not a valid polygon.
    """
    out = shapely.transform(to_degrees(geom), lambda c: np.round(c, DECIMALS))
    out = shapely.orient_polygons(out)
    if out.geom_type not in ("Polygon", "MultiPolygon") or not out.is_valid:
        raise FactsError(f"derived region is not a valid polygon: {out.geom_type}")
    return out


def round_coords(obj: Any) -> Any:
    """Round every float in a nested GeoJSON coordinate structure.

    The geometry is already rounded; this only turns float noise such as
    ``126.94213000000001`` into its shortest repr.

    Args:
        obj: Nested lists/tuples of floats.

    Returns:
        The same structure as lists, floats rounded to :data:`DECIMALS`.
    """
    if isinstance(obj, (list, tuple)):
        return [round_coords(o) for o in obj]
    return round(float(obj), DECIMALS)


def derive_regions(facts: dict[str, Any]) -> list[tuple[dict[str, str], BaseGeometry]]:
    """Compute the region polygons from the facts file.

    Args:
        facts: Parsed facts file.

    Returns:
        ``(properties, geometry)`` per division, in the facts file's order,
        geometry in WGS84 degrees.

    Raises:
        FactsError: Unknown division names or misplaced office points.
    """
    coast = facts["coastline"]
    divisions = facts["divisions"]
    islands = {name: buffered_ring(coast[ring]) for name, ring in ISLAND_RINGS.items()}
    # The main island's and Udo's buffers overlap in the channel; the islet
    # keeps the overlap. The cut adds vertices where the two outlines cross;
    # snapping puts them into the islet's outline too, so that after rounding
    # both regions share the exact same border instead of a thin sliver.
    main_area = buffered_ring(coast[MAIN_RING]).difference(shapely.union_all(list(islands.values())))
    islands = {name: shapely.snap(geom, main_area, NODING_TOLERANCE_M) for name, geom in islands.items()}

    props: list[dict[str, str]] = []
    for div in divisions:
        if div["name_ko"] not in SHORT_NAMES:
            raise FactsError(f"no short name for division {div['name_ko']!r}")
        props.append(
            {
                "name": SHORT_NAMES[div["name_ko"]],
                "name_ko": div["name_ko"],
                "name_en": div["name_en"],
            }
        )

    main_idx = [i for i, p in enumerate(props) if p["name"] not in ISLAND_RINGS]
    office_xy = [(float(d["lng"]) * M_PER_DEG_LNG, float(d["lat"]) * M_PER_DEG_LAT) for d in divisions]
    geoms: dict[int, BaseGeometry] = dict(
        zip(main_idx, voronoi_cells([office_xy[i] for i in main_idx], main_area), strict=True)
    )
    for i, p in enumerate(props):
        if p["name"] in ISLAND_RINGS:
            geoms[i] = islands[p["name"]]

    result = []
    for i, p in enumerate(props):
        if not geoms[i].contains(Point(office_xy[i])):
            raise FactsError(f"{p['name']}: office point lies outside its own region")
        result.append((p, to_output(geoms[i])))
    return result


def region_geojson(facts: dict[str, Any]) -> str:
    """Render the regions as a GeoJSON FeatureCollection, one feature per line.

    Args:
        facts: Parsed facts file.

    Returns:
        The file's text.
    """
    features = []
    for props, geom in derive_regions(facts):
        geo = mapping(geom)
        features.append(
            {
                "type": "Feature",
                "properties": props,
                "geometry": {"type": geo["type"], "coordinates": round_coords(geo["coordinates"])},
            }
        )
    head = {
        "type": "FeatureCollection",
        "generated_by": GENERATED_BY,
        "sources": list(facts["sources"]),
    }
    dump = json.dumps(head, ensure_ascii=False, indent=1)
    # One feature per line keeps diffs readable without a line per coordinate.
    lines = [json.dumps(f, ensure_ascii=False, separators=(",", ":")) for f in features]
    return dump[:-2] + ',\n "features": [\n' + ",\n".join(lines) + "\n ]\n}\n"


def hotspots_json(facts: dict[str, Any], regions_text: str) -> str:
    """Render the hotspot list, each tagged with the region containing it.

    Args:
        facts: Parsed facts file.
        regions_text: The rendered regions file, so tags match what ships.

    Returns:
        The file's text.

    Raises:
        FactsError: A hotspot lies in no region.
    """
    features = json.loads(regions_text)["features"]
    shapes = [(f["properties"]["name"], shapely.geometry.shape(f["geometry"])) for f in features]
    hotspots = []
    for h in facts["hotspots"]:
        lat, lng = float(h["lat"]), float(h["lng"])
        region = next((n for n, g in shapes if g.covers(Point(lng, lat))), None)
        if region is None:
            raise FactsError(f"hotspot {h['name_en']!r} lies in no region")
        entry: dict[str, Any] = {"name": h["name_en"]}
        if h.get("name_ko"):
            entry["name_ko"] = h["name_ko"]
        entry.update({"lat": lat, "lng": lng, "region": region})
        hotspots.append(entry)
    doc = {"generated_by": GENERATED_BY, "sources": list(facts["sources"]), "hotspots": hotspots}
    return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--facts", type=Path, default=DEFAULT_FACTS, help="facts JSON file")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="output directory")
    args = parser.parse_args(argv)

    facts = json.loads(args.facts.read_text(encoding="utf-8"))
    regions_text = region_geojson(facts)
    hotspots_text = hotspots_json(facts, regions_text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((REGIONS_FILE, regions_text), (HOTSPOTS_FILE, hotspots_text)):
        path = args.out_dir / name
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
