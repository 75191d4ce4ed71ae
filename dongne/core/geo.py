"""Spherical-earth geometry helpers: distance, validation and position snapping.

Theory of operation
-------------------

Every distance in dongne is a great-circle distance on a sphere of radius
:data:`EARTH_RADIUS_M` (the IUGG mean earth radius), computed by
:func:`haversine_m`. The spherical model is off by at most ~0.5 % against the
WGS-84 ellipsoid, which is far below the precision a "who is nearby" feature
needs, and it keeps the maths simple enough to derive *exact* bounding boxes
from (see :mod:`dongne.core.spatial`).

Positions shown to other users are coarsened with :func:`snap_position` so that
a local's live position never leaks more precisely than about 100 m.
"""

from __future__ import annotations

import math

__all__ = [
    "EARTH_RADIUS_M",
    "haversine_m",
    "offset_position",
    "snap_position",
    "valid_lat_lng",
]

#: Mean earth radius in metres (IUGG R1), the sphere all distances live on.
EARTH_RADIUS_M = 6_371_008.8

# Metres along a meridian per degree of latitude on the sphere above.
_M_PER_DEG = EARTH_RADIUS_M * math.pi / 180.0


def haversine_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Return the great-circle distance between two positions, in metres.

    Uses the haversine formula, which stays accurate for the short distances
    (metres to kilometres) dongne deals in, unlike the spherical law of cosines.

    Args:
        lat1: Latitude of the first position, in degrees.
        lng1: Longitude of the first position, in degrees.
        lat2: Latitude of the second position, in degrees.
        lng2: Longitude of the second position, in degrees.

    Returns:
        The distance in metres on a sphere of radius :data:`EARTH_RADIUS_M`,
        in ``[0, pi * EARTH_RADIUS_M]``. Longitudes that differ by a multiple
        of 360 degrees describe the same meridian.
    """
    phi1 = math.radians(lat1)
    phi2 = math.radians(lat2)
    sin_dphi = math.sin((phi2 - phi1) * 0.5)
    sin_dlam = math.sin(math.radians(lng2 - lng1) * 0.5)
    a = sin_dphi * sin_dphi + math.cos(phi1) * math.cos(phi2) * sin_dlam * sin_dlam
    # Rounding can push ``a`` a hair past 1 for antipodal points.
    return 2.0 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, a)))


def offset_position(lat: float, lng: float, north_m: float, east_m: float) -> tuple[float, float]:
    """Move a position ``north_m`` metres north and ``east_m`` metres east.

    A local flat-earth step on the sphere of :data:`EARTH_RADIUS_M`: the
    northward metres become degrees along the meridian, the eastward ones
    degrees along the parallel of ``lat``. Along a meridian the step is exact;
    otherwise the new position is ``hypot(north_m, east_m)`` from the old one
    to within centimetres for steps of a few kilometres at mid latitudes
    (9 cm for 2.5 km diagonally at Jeju), which suits what it is for:
    simulated people scattered around a spot, fixtures near a place.

    Args:
        lat: Latitude in degrees; not within a few kilometres of a pole,
            where a parallel is too short for the step.
        lng: Longitude in degrees.
        north_m: Metres to move north (negative: south).
        east_m: Metres to move east (negative: west).

    Returns:
        The moved ``(lat, lng)`` in degrees, not clamped or wrapped: check it
        with :func:`valid_lat_lng` if the step may leave the globe's ranges.
    """
    return (
        lat + north_m / _M_PER_DEG,
        lng + east_m / (_M_PER_DEG * math.cos(math.radians(lat))),
    )


def valid_lat_lng(lat: float, lng: float) -> bool:
    """Tell whether ``(lat, lng)`` is a usable position.

    Args:
        lat: Latitude in degrees.
        lng: Longitude in degrees.

    Returns:
        ``True`` if both are finite real numbers (not ``bool``), ``-90 <= lat
        <= 90`` and ``-180 <= lng <= 180``; ``False`` otherwise, including
        for NaN and infinities.
    """
    for value in (lat, lng):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
    # NaN fails every comparison, so the range checks reject it too; the
    # explicit isfinite keeps the intent readable.
    return math.isfinite(lat) and math.isfinite(lng) and -90.0 <= lat <= 90.0 and -180.0 <= lng <= 180.0


def snap_position(lat: float, lng: float, precision_m: float = 100.0) -> tuple[float, float]:
    """Round a position onto a grid of cells about ``precision_m`` metres wide.

    The grid is defined in metres, not degrees, so the precision is the same
    everywhere:

    * latitude is rounded to the nearest multiple of ``precision_m`` metres
      of arc along a meridian (a fixed step in degrees);
    * longitude is then rounded to the nearest multiple of ``precision_m``
      metres of arc along the *snapped* parallel, so every row of cells has
      its own, fixed step in degrees and the same input always lands in the
      same cell.

    The snapped point is therefore within half a cell in each direction of
    the input: at most ``precision_m / 2`` north-south, about
    ``precision_m / 2`` east-west, so about ``precision_m / sqrt(2)``
    (~70.7 m for the default 100 m grid) in all. Within a cell row next to a
    pole, where a cell would span the whole parallel, the longitude snaps to
    0. The result is clamped to ``[-90, 90]`` and wrapped into
    ``[-180, 180]``.

    Args:
        lat: Latitude in degrees.
        lng: Longitude in degrees.
        precision_m: Cell size in metres; must be finite and positive.

    Returns:
        The snapped ``(lat, lng)``, a valid position.

    Raises:
        ValueError: If the position is invalid (see :func:`valid_lat_lng`) or
            ``precision_m`` is not a finite positive number.
    """
    if not valid_lat_lng(lat, lng):
        raise ValueError(f"invalid position: ({lat!r}, {lng!r})")
    if not (math.isfinite(precision_m) and precision_m > 0):
        raise ValueError(f"precision_m must be finite and positive, got {precision_m!r}")
    lat_step = precision_m / _M_PER_DEG
    snapped_lat = max(-90.0, min(90.0, round(lat / lat_step) * lat_step))
    m_per_deg_lng = _M_PER_DEG * math.cos(math.radians(snapped_lat))
    lng_step = precision_m / m_per_deg_lng if m_per_deg_lng > 0 else math.inf
    if lng_step >= 360.0:
        # The whole parallel fits in one cell (within precision_m of a pole).
        return snapped_lat, 0.0
    snapped_lng = round(lng / lng_step) * lng_step
    if snapped_lng > 180.0:
        snapped_lng -= 360.0
    elif snapped_lng < -180.0:
        snapped_lng += 360.0
    return snapped_lat, snapped_lng
