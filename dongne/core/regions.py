"""Named map regions and point-in-region lookup.

Theory of operation: a :class:`RegionSet` is an immutable, validated set of
named polygons loaded from a GeoJSON FeatureCollection. Lookups go through a
shapely ``STRtree`` (bounding boxes) and then an exact test against prepared
geometries, so each lookup costs a few microseconds however many regions there
are. Regions are expected not to overlap; for points on a shared border (or
inside an overlap, should a file have one) the region listed first in the file
wins, so the answer never depends on tree internals.

Nothing here does network I/O or imports trio. The file-reading helpers are
plain blocking reads of small bundled files, meant to run once at startup.

Coordinates: the API takes ``(lat, lng)`` like the wire protocol; GeoJSON
stores ``[lng, lat]``. The swap happens only inside this module.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

import attrs
import shapely
from shapely.geometry import Point, shape
from shapely.geometry.base import BaseGeometry

__all__ = [
    "Bounds",
    "Hotspot",
    "RegionFileError",
    "RegionSet",
    "load_default_regions",
    "load_hotspots",
    "parse_hotspots",
]

_DATA_PACKAGE = "dongne"
_DEFAULT_REGIONS = "data/jeju_regions.geojson"
_DEFAULT_HOTSPOTS = "data/jeju_hotspots.json"
_POLYGONAL = ("Polygon", "MultiPolygon")

# region_of's grids: cells of 1/200 degree (~555 m by ~465 m at Jeju) and,
# within those on a border or a coast, of 1/1600 degree (~70 m by ~58 m),
# each widened by a margin far above the rounding of lat * 1600 (~1e-13
# degrees). The bundled service area's box is ~26,000 coarse cells, ~3% of
# them on a border or coast, where the escalation bench's beach hotspots put
# a third of its moves. The bound keeps far-flung queries from growing a
# cache without end (past it, cells are judged afresh).
_CELLS_PER_DEG = 200
_FINE_CELLS_PER_DEG = 1600
_CELL_MARGIN_DEG = 1e-9
_MAX_CELLS = 1 << 16


class RegionFileError(ValueError):
    """A region or hotspot file is malformed.

    The message starts with the file (or ``<geojson>`` for in-memory data) and,
    where it applies, the index of the offending feature.
    """


@attrs.frozen
class Bounds:
    """An axis-aligned box in degrees."""

    min_lat: float
    min_lng: float
    max_lat: float
    max_lng: float


@attrs.frozen
class Hotspot:
    """A well-known place, tagged with the region that contains it."""

    name: str
    lat: float
    lng: float
    region: str
    name_ko: str | None = None


def _fail(source: str, problem: str, index: int | None = None) -> RegionFileError:
    where = source if index is None else f"{source}: feature {index}"
    return RegionFileError(f"{where}: {problem}")


def _parse_json(data: bytes | str, source: str) -> Any:
    # Decode explicitly: json.loads(bytes) would also guess UTF-16/32.
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise _fail(source, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(source, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _feature_name(feature: Any, index: int, source: str) -> str:
    if not isinstance(feature, Mapping) or feature.get("type") != "Feature":
        raise _fail(source, "not a GeoJSON Feature object", index)
    props = feature.get("properties")
    name = props.get("name") if isinstance(props, Mapping) else None
    if not isinstance(name, str) or not name:
        raise _fail(source, "missing a non-empty string 'name' property", index)
    return name


def _feature_geometry(feature: Mapping[str, Any], index: int, source: str) -> BaseGeometry:
    gj = feature.get("geometry")
    kind = gj.get("type") if isinstance(gj, Mapping) else None
    if not isinstance(gj, Mapping) or kind not in _POLYGONAL:
        raise _fail(source, f"geometry must be a Polygon or MultiPolygon, got {kind!r}", index)
    try:
        geom = shape(dict(gj))
    except Exception as exc:  # noqa: BLE001 - shapely raises a zoo of types for bad arrays
        raise _fail(source, f"bad {kind} coordinates ({exc})", index) from None
    if geom.is_empty:
        raise _fail(source, f"empty {kind}", index)
    coords = shapely.get_coordinates(geom)
    lng, lat = coords[:, 0], coords[:, 1]
    if not (abs(lng) <= 180).all() or not (abs(lat) <= 90).all():
        # NaN fails both comparisons too. A common cause is [lat, lng] order.
        raise _fail(source, "coordinates outside [-180, 180] x [-90, 90] ([lng, lat] order)", index)
    if not geom.is_valid:
        raise _fail(source, f"invalid {kind}: {shapely.is_valid_reason(geom)}", index)
    return geom


@attrs.frozen(eq=False)
class RegionSet:
    """Immutable named polygons with fast point lookup.

    Build one with :meth:`from_geojson`, :meth:`from_json` or
    :meth:`from_file`; they validate the input. The constructor trusts its
    arguments.

    Args:
        names: Region names, unique, in file order.
        geometries: One valid polygonal geometry per name, ``(lng, lat)``.
        document: The FeatureCollection they came from, for :meth:`to_geojson`.
    """

    _names: tuple[str, ...]
    _geometries: tuple[BaseGeometry, ...] = attrs.field(repr=False)
    _document: Mapping[str, Any] = attrs.field(repr=False)
    _tree: shapely.STRtree = attrs.field(init=False, repr=False)
    # Grid cell -> (its region, or None; whether that answers every point in it),
    # for the coarse grid and, inside coarse cells that do not decide, the fine one.
    _cells: dict[tuple[int, int], tuple[str | None, bool]] = attrs.field(init=False, repr=False, factory=dict)
    _fine_cells: dict[tuple[int, int], tuple[str | None, bool]] = attrs.field(init=False, repr=False, factory=dict)

    @_tree.default
    def _build_tree(self) -> shapely.STRtree:
        # Preparing caches GEOS indexes on each polygon, which makes the exact
        # intersects test after the tree's bbox filter fast.
        shapely.prepare(list(self._geometries))
        return shapely.STRtree(self._geometries)

    @classmethod
    def from_geojson(cls, document: Any, *, source: str = "<geojson>") -> RegionSet:
        """Validate a parsed GeoJSON FeatureCollection and index it.

        Args:
            document: The parsed JSON value. It is deep-copied.
            source: How to name the input in error messages.

        Returns:
            The region set, regions in feature order.

        Raises:
            RegionFileError: It is not a FeatureCollection, has no features, or
                a feature lacks a unique string ``name`` property or a valid
                Polygon/MultiPolygon geometry.
        """
        if not isinstance(document, Mapping) or document.get("type") != "FeatureCollection":
            is_map = isinstance(document, Mapping)
            found = document.get("type") if is_map else type(document).__name__
            raise _fail(source, f"not a GeoJSON FeatureCollection (found {found!r})")
        features = document.get("features")
        if not isinstance(features, list) or not features:
            raise _fail(source, "FeatureCollection has no features")
        names: list[str] = []
        geometries: list[BaseGeometry] = []
        first_index: dict[str, int] = {}
        for index, feature in enumerate(features):
            name = _feature_name(feature, index, source)
            if name in first_index:
                first = first_index[name]
                problem = f"duplicate name {name!r} (first used by feature {first})"
                raise _fail(source, problem, index)
            first_index[name] = index
            geometries.append(_feature_geometry(feature, index, source))
            names.append(name)
        return cls(tuple(names), tuple(geometries), copy.deepcopy(dict(document)))

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "<geojson>") -> RegionSet:
        """Parse and validate GeoJSON text.

        Args:
            data: UTF-8 bytes or text.
            source: How to name the input in error messages.

        Returns:
            The region set.

        Raises:
            RegionFileError: The text is not JSON, or see :meth:`from_geojson`.
        """
        return cls.from_geojson(_parse_json(data, source), source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RegionSet:
        """Read, parse and validate a GeoJSON file.

        Args:
            path: The file.

        Returns:
            The region set.

        Raises:
            RegionFileError: The content is malformed; see :meth:`from_json`.
            OSError: The file cannot be read.
        """
        with open(path, "rb") as f:
            data = f.read()
        return cls.from_json(data, source=os.fspath(path))

    @property
    def names(self) -> tuple[str, ...]:
        """Region names in file order."""
        return self._names

    @property
    def bounds(self) -> Bounds:
        """The box enclosing every region."""
        west, south, east, north = shapely.total_bounds(self._geometries)
        return Bounds(min_lat=float(south), min_lng=float(west), max_lat=float(north), max_lng=float(east))

    def __len__(self) -> int:
        return len(self._names)

    def region_of(self, lat: float, lng: float) -> str | None:
        """Name the region containing a point.

        Args:
            lat: Latitude in degrees.
            lng: Longitude in degrees.

        Returns:
            The region's name, or None when no region contains the point
            (including non-finite input). A point on a border between regions
            belongs to whichever of them comes first in the file.
        """
        if not (math.isfinite(lat) and math.isfinite(lng)):
            return None
        # Answered per cell of a fixed grid where the cell decides (see
        # _cell): every location update asks, and the exact test costs ~8 us.
        # Cells on a border or a coast are split into a finer grid; only
        # points in fine cells that still do not decide get the exact test.
        for cells, per_deg in ((self._cells, _CELLS_PER_DEG), (self._fine_cells, _FINE_CELLS_PER_DEG)):
            key = (math.floor(lat * per_deg), math.floor(lng * per_deg))
            cell = cells.get(key)
            if cell is None:
                cell = self._cell(key, per_deg)
                if len(cells) < _MAX_CELLS:
                    cells[key] = cell
            name, whole = cell
            if whole:
                return name
        return self._exact(lat, lng)

    def _exact(self, lat: float, lng: float) -> str | None:
        # The tree filters by bounding box only; the exact test follows, in
        # file order so that border points resolve deterministically.
        candidates: list[int] = self._tree.query(Point(lng, lat)).tolist()
        for i in sorted(candidates):
            if shapely.intersects_xy(self._geometries[i], lng, lat):
                return self._names[i]
        return None

    def _cell(self, key: tuple[int, int], per_deg: int) -> tuple[str | None, bool]:
        """What a grid cell says about the points in it: ``(region, True)`` when that is every point's answer.

        The cell's box, widened by a hair so that it surely holds every point
        whose coordinates floor to it: if it meets no region, every point in it
        is in none; if it meets exactly one and that region covers it, every
        point in it is in that region (and in no other, so file order cannot
        matter). Otherwise, on a border or a coast, ``(None, False)``: each
        point gets the exact test.
        """
        i, j = key
        box = shapely.box(
            j / per_deg - _CELL_MARGIN_DEG,
            i / per_deg - _CELL_MARGIN_DEG,
            (j + 1) / per_deg + _CELL_MARGIN_DEG,
            (i + 1) / per_deg + _CELL_MARGIN_DEG,
        )
        met = [k for k in sorted(self._tree.query(box).tolist()) if shapely.intersects(self._geometries[k], box)]
        if not met:
            return None, True
        if len(met) == 1 and shapely.covers(self._geometries[met[0]], box):
            return self._names[met[0]], True
        return None, False

    def geometry(self, name: str) -> BaseGeometry:
        """A region's polygon, in ``(lng, lat)`` order.

        Args:
            name: A name from :attr:`names`.

        Returns:
            The shapely geometry (treat it as read-only).

        Raises:
            KeyError: No region has that name.
        """
        try:
            return self._geometries[self._names.index(name)]
        except ValueError:
            raise KeyError(name) from None

    def to_geojson(self) -> dict[str, Any]:
        """The FeatureCollection this set was built from.

        Returns:
            A fresh deep copy, safe to mutate or serialize.
        """
        return copy.deepcopy(dict(self._document))


def load_default_regions() -> RegionSet:
    """Load the bundled Jeju regions (``dongne/data/jeju_regions.geojson``).

    Returns:
        The 15 Jeju divisions.

    Raises:
        RegionFileError: The bundled file is malformed (a packaging bug).
    """
    resource = resources.files(_DATA_PACKAGE).joinpath(_DEFAULT_REGIONS)
    return RegionSet.from_json(resource.read_bytes(), source=str(resource))


def _hotspot(entry: Any, index: int, source: str) -> Hotspot:
    if not isinstance(entry, Mapping):
        raise _fail(source, f"hotspot {index} is not an object")
    name, region, name_ko = entry.get("name"), entry.get("region"), entry.get("name_ko")
    lat, lng = _number(entry.get("lat")), _number(entry.get("lng"))
    if not (isinstance(name, str) and isinstance(region, str)):
        raise _fail(source, f"hotspot {index} needs string 'name' and 'region'")
    if name_ko is not None and not isinstance(name_ko, str):
        raise _fail(source, f"hotspot {index}: 'name_ko' must be a string")
    if lat is None or lng is None:
        raise _fail(source, f"hotspot {index} needs finite numeric 'lat' and 'lng'")
    return Hotspot(name=name, lat=lat, lng=lng, region=region, name_ko=name_ko)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def load_hotspots() -> list[Hotspot]:
    """Load the bundled Jeju hotspots (``dongne/data/jeju_hotspots.json``).

    Returns:
        The hotspots in file order.

    Raises:
        RegionFileError: The bundled file is malformed (a packaging bug).
    """
    resource = resources.files(_DATA_PACKAGE).joinpath(_DEFAULT_HOTSPOTS)
    return parse_hotspots(resource.read_bytes(), source=str(resource))


def parse_hotspots(data: bytes | str, *, source: str = "<hotspots>") -> list[Hotspot]:
    """Parse a hotspots file: an object with a ``hotspots`` list.

    Args:
        data: UTF-8 bytes or text.
        source: How to name the input in error messages.

    Returns:
        The hotspots in file order.

    Raises:
        RegionFileError: Not JSON, no ``hotspots`` list, or an entry without
            string ``name``/``region`` and finite numeric ``lat``/``lng``.
    """
    doc = _parse_json(data, source)
    entries = doc.get("hotspots") if isinstance(doc, Mapping) else None
    if not isinstance(entries, list):
        raise _fail(source, "missing a 'hotspots' list")
    return [_hotspot(e, i, source) for i, e in enumerate(entries)]
