"""In-memory spatial index of online locals' live positions.

Theory of operation
-------------------

:class:`LocalsIndex` keeps one position per user id in an R-tree
(``rtree.index.Index``). The tree lives in a *locally scaled plane*:
``x = lng * cos(lat0)``, ``y = lat``, with ``lat0`` the latitude the service is
centred on (Jeju by default). Near ``lat0`` a unit of ``x`` and of ``y`` cover
about the same ground, so the tree's Euclidean "nearest" is a good stand-in
for great-circle nearest; it is never trusted for the final answer, though.

Every answer is **exact**: the same as scanning every user with
:func:`~dongne.core.geo.haversine_m` and sorting by ``(distance, user_id)``.
Two facts make that cheap:

1. *A conservative box.* All points within great-circle distance ``r`` of a
   query lie in a latitude band of half-width ``r / R`` and, unless the cap
   holds a pole, a longitude band of half-width ``asin(sin(r / R) /
   cos(lat))`` (both in radians). :func:`_degree_boxes` builds that box, a
   few millimetres larger to absorb rounding, split in two where it crosses
   the antimeridian. An R-tree intersection with it returns a superset of
   the answer, which a haversine filter then trims exactly.

2. *An upper bound from any k points.* For ``nearest_within(k)``, the tree's
   planar ``nearest`` supplies ``k`` (non-excluded) candidates; whatever they
   are, the k-th smallest of their haversine distances, ``d_k``, bounds the
   true k-th nearest distance from above (there *are* ``k`` users that
   close). So the box for ``min(d_k, radius)`` is certain to hold the true
   top k, ties included. Because the plane is locally faithful, ``d_k`` is
   close to the truth and that box holds only a handful of extra users.

Moves are a delete plus an insert of the same integer id. The tree is built
with a low fill factor (0.4) and small nodes (32 entries): measured on 100k
points around Jeju, the default fill factor of 0.7 makes a move cost ~600 us
(node condensing on delete forces reinserts), whereas 0.4 brings it to
~20-40 us; 32-entry nodes are also the fastest for ``nearest`` and
intersection queries at that size.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Collection, Iterable
from typing import Any, NoReturn

import attrs
import numpy as np
import numpy.typing as npt
from rtree import core as rtree_core
from rtree import index as rtree_index
from rtree.exceptions import RTreeError

from .geo import EARTH_RADIUS_M, valid_lat_lng

__all__ = [
    "JEJU_LAT0",
    "LocalsIndex",
    "LocalsIndexStatistics",
]

#: Default latitude of the local plane: the middle of Jeju island.
JEJU_LAT0 = 33.38

# R-tree tuning; see "Theory of operation" above for the measurements.
_FILL_FACTOR = 0.4
_NODE_CAPACITY = 32
# Must be below both capacities (libspatialindex rejects the default of 32).
_NEAR_MINIMUM_OVERLAP_FACTOR = 16

# Widening of every query box, in radians of arc (~6 mm) plus a relative
# part: far more than the rounding error of haversine_m or of the box maths,
# far less than anything that would matter for speed.
_BOX_MARGIN_RAD = 1e-9
_BOX_MARGIN_REL = 1e-9

_HALF_PI = math.pi / 2.0
_TWO_R = 2.0 * EARTH_RADIUS_M

# (lat_min, lat_max, lng_min, lng_max), in degrees.
_DegreeBox = tuple[float, float, float, float]
_FULL_BOX: _DegreeBox = (-90.0, 90.0, -180.0, 180.0)


@attrs.frozen
class LocalsIndexStatistics:
    """A snapshot of a :class:`LocalsIndex`'s bookkeeping.

    Attributes:
        users: Users currently indexed.
        allocated_ids: Integer R-tree ids ever handed out; never exceeds the
            peak number of users indexed at once, because freed ids are reused.
        free_ids: Allocated ids currently waiting for reuse.
    """

    users: int
    allocated_ids: int
    free_ids: int


def _degree_boxes(lat: float, lng: float, radius_m: float) -> list[_DegreeBox]:
    """Return boxes covering every point within ``radius_m`` of a position.

    The boxes are conservative (slightly too large), never too small, and
    together cover the great-circle cap of that radius. There are two boxes
    when the cap crosses the antimeridian, otherwise one.

    Args:
        lat: Latitude of the centre, in degrees; must be valid.
        lng: Longitude of the centre, in degrees; must be valid.
        radius_m: Radius in metres, ``>= 0`` (``inf`` allowed).

    Returns:
        A list of ``(lat_min, lat_max, lng_min, lng_max)`` boxes in degrees.
    """
    d = radius_m / EARTH_RADIUS_M * (1.0 + _BOX_MARGIN_REL) + _BOX_MARGIN_RAD
    if d >= math.pi:
        return [_FULL_BOX]
    phi = math.radians(lat)
    lat_min = math.degrees(phi - d)
    lat_max = math.degrees(phi + d)
    if phi - d <= -_HALF_PI or phi + d >= _HALF_PI:
        # The cap holds a pole: every meridian passes through it.
        return [(max(-90.0, lat_min), min(90.0, lat_max), -180.0, 180.0)]
    # Widest longitude offset on the cap (the tangent meridians' offset).
    # Here d < pi/2 - |phi|, so the ratio is below 1; min() guards rounding.
    dlng = math.degrees(math.asin(min(1.0, math.sin(d) / math.cos(phi))))
    dlng += math.degrees(_BOX_MARGIN_RAD)
    if dlng >= 180.0:
        return [(lat_min, lat_max, -180.0, 180.0)]
    lo = lng - dlng
    hi = lng + dlng
    if lo < -180.0:
        return [(lat_min, lat_max, lo + 360.0, 180.0), (lat_min, lat_max, -180.0, hi)]
    if hi > 180.0:
        return [(lat_min, lat_max, lo, 180.0), (lat_min, lat_max, -180.0, hi - 360.0)]
    return [(lat_min, lat_max, lo, hi)]


_INT64_P = ctypes.POINTER(ctypes.c_int64)
_VOID_P_P = ctypes.POINTER(ctypes.c_void_p)
# A point's or a box corner's coordinates, as libspatialindex takes them.
_BOX_TYPE = ctypes.c_double * 2


_NO_DATA = ctypes.c_ubyte(0)


def _unchecked(name: str) -> Any:
    """libspatialindex's function ``name``, declared as rtree declares it, without rtree's ``errcheck`` hook.

    rtree runs a Python function after every call to check the result
    code; :class:`_Tree` checks it inline instead (one ``if``).
    """
    declared = getattr(rtree_core.rt, name)
    function: Any = rtree_core.rt._FuncPtr((name, rtree_core.rt))
    function.__name__ = name  # as ctypes names the functions it looks up itself
    function.argtypes = declared.argtypes
    function.restype = declared.restype
    return function


_INSERT = _unchecked("Index_InsertData")
_DELETE = _unchecked("Index_DeleteData")
_INTERSECTS = _unchecked("Index_Intersects_id")
_NEAREST = _unchecked("Index_NearestNeighbors_id")
_FREE = _unchecked("Index_Free")


def _failed(function: Any) -> NoReturn:
    """Raise what rtree's check raises for a call of ``function`` that returned an error code."""
    message = rtree_core.rt.Error_GetLastErrorMsg().decode()
    rtree_core.rt.Error_Reset()
    raise RTreeError(f'Error in "{function.__name__}": {message}')


class _Tree:
    """A 2-d point R-tree: ``rtree.index.Index`` called as its methods call libspatialindex, minus their work.

    The index's moves and queries are its hot path (a move is a delete
    and an insert, 500 a second in the escalation bench, and every move
    asks for the open questions nearby). ``Index.insert``, ``delete``,
    ``intersection`` and ``nearest`` ask the library for the index's type
    and dimension, rebuild the coordinate arrays from a list, and run a
    Python check after each call; here the arguments' ctypes objects are
    made once and the result code is checked inline. The ids are read
    without ``ctypes.cast``: each cast leaves a reference cycle behind (4
    objects, ~0.5 KB per query), garbage that only the cyclic collector
    frees. Same calls, same arguments, same ids in the same order.

    Not thread-safe (the buffers are shared): the owner serializes calls.
    """

    __slots__ = ("_handle", "_ids", "_ids_ref", "_ids_to_free", "_index", "_maxs", "_mins", "_n", "_n_ref", "_point")

    def __init__(self, properties: rtree_index.Property) -> None:
        self._index = rtree_index.Index(properties=properties)  # owns the handle, and frees it
        self._handle = ctypes.c_void_p(self._index.handle._as_parameter_)
        self._point = _BOX_TYPE()
        self._mins = _BOX_TYPE()
        self._maxs = _BOX_TYPE()
        self._ids = _INT64_P()
        self._ids_ref = ctypes.byref(self._ids)
        self._ids_to_free = _VOID_P_P.from_buffer(self._ids)  # the same pointer, as Index_Free takes it
        self._n = ctypes.c_uint64()
        self._n_ref = ctypes.byref(self._n)

    def insert(self, rid: int, x: float, y: float) -> None:
        """``Index.insert(rid, (x, y, x, y))``, storing no object."""
        point = self._point
        point[0] = x
        point[1] = y
        if _INSERT(self._handle, rid, point, point, 2, _NO_DATA, 0):
            _failed(_INSERT)

    def delete(self, rid: int, x: float, y: float) -> None:
        """``Index.delete(rid, (x, y, x, y))``."""
        point = self._point
        point[0] = x
        point[1] = y
        if _DELETE(self._handle, rid, point, point, 2):
            _failed(_DELETE)

    def _query(self, query: Any, box: tuple[float, float, float, float], count: int) -> int:
        """Run an id query; its ids are in ``self._ids`` until :meth:`_free`. Returns how many."""
        mins, maxs = self._mins, self._maxs
        mins[0], mins[1], maxs[0], maxs[1] = box
        self._n.value = count
        if query(self._handle, mins, maxs, 2, self._ids_ref, self._n_ref):
            _failed(query)
        return self._n.value

    def _free(self) -> None:
        _FREE(self._ids_to_free)

    def _query_ids(self, query: Any, box: tuple[float, float, float, float], count: int) -> list[int]:
        n = self._query(query, box, count)
        try:
            return self._ids[:n]
        finally:
            self._free()

    def intersection(self, box: tuple[float, float, float, float]) -> list[int]:
        """``list(Index.intersection(box))``: the ids of the points in ``(x_min, y_min, x_max, y_max)``."""
        return self._query_ids(_INTERSECTS, box, 0)

    def nearest(self, box: tuple[float, float, float, float], count: int) -> list[int]:
        """``list(Index.nearest(box, count))``: the ``count`` ids nearest in the plane (more on ties)."""
        return self._query_ids(_NEAREST, box, count)

    def intersection_awake(
        self, box: tuple[float, float, float, float], snoozed: npt.NDArray[np.float64], at: float
    ) -> list[int]:
        """:meth:`intersection` without the ids snoozed past ``at``: filtered by numpy, no int per id dropped."""
        n = self._query(_INTERSECTS, box, 0)
        try:
            if not n:
                return []
            rids = np.frombuffer(
                memoryview((ctypes.c_int64 * n).from_address(ctypes.addressof(self._ids.contents))), np.int64
            )
            kept: list[int] = rids[snoozed[rids] <= at].tolist()
            return kept
        finally:
            self._free()


def _check_position(lat: float, lng: float) -> None:
    if not valid_lat_lng(lat, lng):
        raise ValueError(f"invalid position: ({lat!r}, {lng!r})")


def _check_radius(radius_m: float) -> None:
    # ``not radius_m >= 0`` also rejects NaN.
    if not radius_m >= 0:
        raise ValueError(f"radius_m must be >= 0, got {radius_m!r}")


class LocalsIndex:
    """Live positions of online locals, queryable by great-circle distance.

    One position per user id; :meth:`upsert` moves a user who is already
    indexed. All queries are exact: they return what a brute-force
    :func:`~dongne.core.geo.haversine_m` scan over every user would, sorted
    nearest first with ties broken by user id.

    Sans-I/O and single-threaded: the owner serializes calls (in dongne, the
    trio task that owns the index).

    Args:
        lat0: Latitude, in degrees, of the local plane the R-tree works in;
            choose the middle of the served area. Affects speed only, never
            answers. Must be finite and strictly between -90 and 90.

    Raises:
        ValueError: If ``lat0`` is out of range.
    """

    def __init__(self, lat0: float = JEJU_LAT0) -> None:
        if not (math.isfinite(lat0) and -90.0 < lat0 < 90.0):
            raise ValueError(f"lat0 must be strictly between -90 and 90, got {lat0!r}")
        self._lat0 = float(lat0)
        self._x_scale = math.cos(math.radians(lat0))
        props = rtree_index.Property()
        props.dimension = 2
        props.fill_factor = _FILL_FACTOR
        props.leaf_capacity = _NODE_CAPACITY
        props.index_capacity = _NODE_CAPACITY
        props.near_minimum_overlap_factor = _NEAR_MINIMUM_OVERLAP_FACTOR
        self._tree = _Tree(props)
        # user id -> (lat, lng, rtree id, x, phi, cos_phi). x is kept so a
        # delete passes the tree exactly the coordinates that were inserted;
        # phi and cos_phi (radians(lat), cos(radians(lat))) so distances
        # skip two math calls per candidate (see _distances).
        self._entries: dict[str, tuple[float, float, int, float, float, float]] = {}
        # rtree id -> user id; None marks a freed slot.
        self._uids: list[str | None] = []
        self._free: list[int] = []
        # rtree id -> until when the user is snoozed (see snooze); -inf: not.
        self._snoozed = np.full(64, -math.inf)

    @property
    def lat0(self) -> float:
        """The latitude of the local plane, in degrees."""
        return self._lat0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._entries

    def statistics(self) -> LocalsIndexStatistics:
        """Return a snapshot of the index's bookkeeping.

        Returns:
            A :class:`LocalsIndexStatistics`.
        """
        return LocalsIndexStatistics(
            users=len(self._entries),
            allocated_ids=len(self._uids),
            free_ids=len(self._free),
        )

    def position(self, user_id: str) -> tuple[float, float] | None:
        """Return a user's indexed position.

        Args:
            user_id: The user.

        Returns:
            ``(lat, lng)`` in degrees, or ``None`` if the user is not indexed.
        """
        entry = self._entries.get(user_id)
        if entry is None:
            return None
        return entry[0], entry[1]

    def upsert(self, user_id: str, lat: float, lng: float) -> None:
        """Index a user at a position, moving them if already indexed.

        Args:
            user_id: The user.
            lat: Latitude in degrees.
            lng: Longitude in degrees.

        Raises:
            ValueError: If the position is invalid (see
                :func:`~dongne.core.geo.valid_lat_lng`); the index is then
                unchanged.
        """
        _check_position(lat, lng)
        lat = float(lat)
        lng = float(lng)
        x = lng * self._x_scale
        entry = self._entries.get(user_id)
        if entry is None:
            if self._free:
                rid = self._free.pop()
                self._uids[rid] = user_id
            else:
                rid = len(self._uids)
                self._uids.append(user_id)
                if rid >= len(self._snoozed):
                    grown = np.full(2 * len(self._snoozed), -math.inf)
                    grown[: len(self._snoozed)] = self._snoozed
                    self._snoozed = grown
        else:
            old_lat, old_lng, rid, old_x, _, _ = entry
            if old_lat == lat and old_lng == lng:
                return
            self._tree.delete(rid, old_x, old_lat)
        self._tree.insert(rid, x, lat)
        phi = math.radians(lat)
        self._entries[user_id] = (lat, lng, rid, x, phi, math.cos(phi))

    def remove(self, user_id: str) -> None:
        """Drop a user from the index; do nothing if they are not indexed.

        Args:
            user_id: The user.
        """
        entry = self._entries.pop(user_id, None)
        if entry is None:
            return
        lat, _, rid, x, _, _ = entry
        self._tree.delete(rid, x, lat)
        self._uids[rid] = None
        self._snoozed[rid] = -math.inf
        self._free.append(rid)

    def snooze(self, user_id: str, until: float) -> None:
        """Leave an indexed user out of queries made with ``awake_at`` before ``until``; do nothing if not indexed.

        A filter applied in bulk to the tree's ids, before any per-user
        Python runs: the escalation planner snoozes a local at their hourly
        cap until the time they have room again, and a QUICK stage in a busy
        area then skips hundreds of them without looking at each. The owner
        must keep ``until`` no later than what it stands for (lower it when
        that changes); ``-inf`` wakes the user. Moves keep it, removal drops it.

        Args:
            user_id: The user.
            until: A time, in the owner's units (the planner's: ms).
        """
        entry = self._entries.get(user_id)
        if entry is not None:
            self._snoozed[entry[2]] = until

    def wake_all(self) -> None:
        """Undo every :meth:`snooze`."""
        self._snoozed.fill(-math.inf)

    def within(
        self, lat: float, lng: float, radius_m: float, keep: Callable[[str], bool] | None = None
    ) -> list[tuple[str, float]]:
        """Return every user within a great-circle radius of a position.

        Args:
            lat: Latitude of the centre, in degrees.
            lng: Longitude of the centre, in degrees.
            radius_m: Radius in metres, inclusive; ``>= 0``, ``inf`` allowed.
            keep: Optional filter on user ids, applied before any distance is
                computed (an escalation stage passes its eligibility rule: in a
                busy area most locals within 5 km are at their hourly cap, and
                their distances are never needed).

        Returns:
            ``(user_id, distance_m)`` pairs, nearest first, ties by user id.

        Raises:
            ValueError: If the position or the radius is invalid.
        """
        return [(uid, dist) for dist, uid in self.within_by_distance(lat, lng, radius_m, keep)]

    def within_by_distance(
        self,
        lat: float,
        lng: float,
        radius_m: float,
        keep: Callable[[str], bool] | None = None,
        awake_at: float | None = None,
    ) -> list[tuple[float, str]]:
        """:meth:`within` as ``(distance_m, user_id)`` pairs: the same hits, in the same order.

        The planner's form: the pairs sort as they are (no key function) and
        need no reshaping on the way to a stage's targets. Given
        ``awake_at``, users snoozed until after it (:meth:`snooze`) are left
        out before ``keep`` sees them.
        """
        _check_position(lat, lng)
        _check_radius(radius_m)
        hits = self._collect(lat, lng, radius_m, keep=keep, awake_at=awake_at)
        hits.sort()
        return hits

    def count_within(self, lat: float, lng: float, radius_m: float) -> int:
        """Count the users within a great-circle radius of a position.

        Args:
            lat: Latitude of the centre, in degrees.
            lng: Longitude of the centre, in degrees.
            radius_m: Radius in metres, inclusive; ``>= 0``, ``inf`` allowed.

        Returns:
            The number of users :meth:`within` would return.

        Raises:
            ValueError: If the position or the radius is invalid.
        """
        _check_position(lat, lng)
        _check_radius(radius_m)
        return len(self._collect(lat, lng, radius_m))

    def nearest_within(
        self,
        lat: float,
        lng: float,
        radius_m: float,
        k: int,
        exclude: Collection[str] = frozenset(),
    ) -> list[tuple[str, float]]:
        """Return the ``k`` users nearest to a position, within a radius.

        Args:
            lat: Latitude of the centre, in degrees.
            lng: Longitude of the centre, in degrees.
            radius_m: Radius in metres, inclusive; ``>= 0``, ``inf`` for none.
            k: At most this many users are returned; ``>= 0``.
            exclude: User ids never to return (e.g. the asker). A set is
                fastest; it is probed with ``in``.

        Returns:
            Up to ``k`` ``(user_id, distance_m)`` pairs, nearest first, ties by
            user id: exactly the first ``k`` of :meth:`within` once ``exclude``
            is dropped.

        Raises:
            ValueError: If the position or the radius is invalid, or ``k < 0``.
        """
        _check_position(lat, lng)
        _check_radius(radius_m)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k!r}")
        if k == 0 or not self._entries:
            return []
        bound = radius_m
        entries = self._entries
        known: dict[str, float] = {}
        want = k + sum(1 for uid in exclude if uid in entries)
        if want < len(entries):
            # Any k non-excluded users give an upper bound on the true k-th
            # nearest distance; the plane's nearest ones give a tight one.
            x = lng * self._x_scale
            uids = self._uids
            known_ids = [
                uid
                for uid in map(
                    uids.__getitem__,
                    self._tree.nearest((x, lat, x, lat), want),
                )
                if uid is not None and uid not in exclude
            ]
            known = self._distances(lat, lng, known_ids, {})
            if len(known) >= k:
                bound = min(bound, sorted(known.values())[k - 1])
        hits = self._collect(lat, lng, bound, exclude, known)
        hits.sort()
        return [(uid, dist) for dist, uid in hits[:k]]

    def _distances(self, lat: float, lng: float, uids: Iterable[str], known: dict[str, float]) -> dict[str, float]:
        """Return ``{user_id: distance_m}`` from a position, reusing ``known``.

        The formula is :func:`~dongne.core.geo.haversine_m`'s, operation for
        operation, with the query as the first point and the user's
        precomputed ``phi`` and ``cos(phi)``: results are bit-identical to
        ``haversine_m(lat, lng, user_lat, user_lng)``, which the tests check
        against a brute-force scan. Inlined because it is the hot loop.
        """
        entries = self._entries
        sin = math.sin
        radians = math.radians
        phi1 = radians(lat)
        cos_phi1 = math.cos(phi1)
        out: dict[str, float] = {}
        for uid in uids:
            dist = known.get(uid)
            if dist is None:
                _, plng, _, _, phi2, cos_phi2 = entries[uid]
                sin_dphi = sin((phi2 - phi1) * 0.5)
                sin_dlam = sin(radians(plng - lng) * 0.5)
                a = sin_dphi * sin_dphi + cos_phi1 * cos_phi2 * sin_dlam * sin_dlam
                dist = _TWO_R * math.asin(math.sqrt(min(1.0, a)))
            out[uid] = dist
        return out

    def _collect(
        self,
        lat: float,
        lng: float,
        radius_m: float,
        exclude: Collection[str] = (),
        known: dict[str, float] | None = None,
        keep: Callable[[str], bool] | None = None,
        awake_at: float | None = None,
    ) -> list[tuple[float, str]]:
        """Return the unsorted ``(distance_m, user_id)`` within ``radius_m``.

        ``known`` holds distances already computed for some users; ``keep``
        filters ids before distances are computed, after those snoozed past
        ``awake_at`` (if given) are dropped in bulk. One pass over the tree's
        ids: a QUICK stage's 5 km box holds ~700 locals in the escalation
        bench, and each step per candidate (a list, a dict, a second loop)
        showed in its profile. The distance is :meth:`_distances`' formula,
        operation for operation.
        """
        scale = self._x_scale
        uids = self._uids
        entries = self._entries
        known = known or {}
        sin = math.sin
        asin = math.asin
        sqrt = math.sqrt
        radians = math.radians
        phi1 = radians(lat)
        cos_phi1 = math.cos(phi1)
        hits: list[tuple[float, str]] = []
        append = hits.append
        for lat_min, lat_max, lng_min, lng_max in _degree_boxes(lat, lng, radius_m):
            # x = lng * scale is monotonic in lng, also after rounding, so the
            # scaled box keeps every point of the degree box.
            coords = (lng_min * scale, lat_min, lng_max * scale, lat_max)
            if awake_at is None:
                rids = self._tree.intersection(coords)
            else:
                rids = self._tree.intersection_awake(coords, self._snoozed, awake_at)
            for rid in rids:
                uid = uids[rid]
                if uid is None or uid in exclude or (keep is not None and not keep(uid)):
                    continue
                dist = known.get(uid)
                if dist is None:
                    _, plng, _, _, phi2, cos_phi2 = entries[uid]
                    sin_dphi = sin((phi2 - phi1) * 0.5)
                    sin_dlam = sin(radians(plng - lng) * 0.5)
                    a = sin_dphi * sin_dphi + cos_phi1 * cos_phi2 * sin_dlam * sin_dlam
                    dist = _TWO_R * asin(sqrt(min(1.0, a)))
                if dist <= radius_m:
                    append((dist, uid))
        # Antimeridian boxes are disjoint (their longitude ranges never
        # overlap while dlng < 180), so no user is collected twice.
        return hits
