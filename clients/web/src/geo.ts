// Positions: where I am (Geolocation API, or a place chosen on the map), distances, regions.
import { shared, store } from "./app";
import type { Loc, RegionFeature } from "./types";

const R = 6_371_000;
const rad = (d: number) => (d * Math.PI) / 180;

export function haversine(a: Loc, b: Loc): number {
  const dLat = rad(b.lat - a.lat), dLng = rad(b.lng - a.lng);
  const s = Math.sin(dLat / 2) ** 2 + Math.cos(rad(a.lat)) * Math.cos(rad(b.lat)) * Math.sin(dLng / 2) ** 2;
  return 2 * R * Math.asin(Math.sqrt(s));
}

export function ringsOf(f: RegionFeature): number[][][] {
  return f.geometry.type === "Polygon" ? f.geometry.coordinates : f.geometry.coordinates.flat();
}

function inRing(ring: number[][], lng: number, lat: number): boolean {
  let inside = false;
  for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
    const [xi, yi] = ring[i] as [number, number];
    const [xj, yj] = ring[j] as [number, number];
    if (yi > lat !== yj > lat && lng < ((xj - xi) * (lat - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

/** The region containing `loc` (even-odd over all its rings), or null outside the service area. */
export function regionAt(loc: Loc): RegionFeature | null {
  for (const f of shared.regions.features) {
    let inside = false;
    for (const ring of ringsOf(f)) if (inRing(ring, loc.lng, loc.lat)) inside = !inside;
    if (inside) return f;
  }
  return null;
}

export function regionName(name: string | undefined | null): string {
  if (!name) return "";
  const f = shared.regions.features.find((r) => r.properties.name === name);
  if (!f) return name;
  return store.get().lang === "ko" ? shortKo(f.properties.name_ko ?? name) : name;
}

/** "제주시 동지역" reads as "제주시" in a chip. */
function shortKo(name: string): string {
  return name.replace(/\s*동지역$/, "");
}

/** A point inside a region to stand for it (the label point of its largest ring, in lng/lat). */
export function regionCentre(f: RegionFeature): Loc {
  let best: { area: number; lng: number; lat: number } | null = null;
  for (const ring of ringsOf(f)) {
    let a = 0, cx = 0, cy = 0;
    for (let i = 0; i < ring.length - 1; i++) {
      const [x0, y0] = ring[i] as [number, number];
      const [x1, y1] = ring[i + 1] as [number, number];
      const c = x0 * y1 - x1 * y0;
      a += c; cx += (x0 + x1) * c; cy += (y0 + y1) * c;
    }
    if (a !== 0 && (!best || Math.abs(a) > best.area)) best = { area: Math.abs(a), lng: cx / (3 * a), lat: cy / (3 * a) };
  }
  const centre = best ? { lat: best.lat, lng: best.lng } : { lat: 33.38, lng: 126.55 };
  return regionAt(centre) ? centre : nudgeInside(f, centre);
}

function nudgeInside(f: RegionFeature, centre: Loc): Loc {
  const ring = ringsOf(f)[0] ?? [];
  let best = centre, bestD = Infinity;
  for (const [lng, lat] of ring as [number, number][]) {
    const p = { lat: (lat * 3 + centre.lat) / 4, lng: (lng * 3 + centre.lng) / 4 };
    const d = haversine(p, centre);
    if (d < bestD && regionAt(p)?.properties.name === f.properties.name) { best = p; bestD = d; }
  }
  return best;
}

// ---- the Geolocation API

let watchId: number | null = null;

/** Follow the device's position while the page is open; a place chosen on the map wins until GPS is asked for again. */
export function watchGps(): void {
  if (watchId !== null) return;
  if (!("geolocation" in navigator)) {
    store.set({ geo: "unavailable" });
    return;
  }
  store.set({ geo: "watching" });
  watchId = navigator.geolocation.watchPosition(
    (pos) => {
      if (store.get().meSource === "map") return;
      const me = { lat: pos.coords.latitude, lng: pos.coords.longitude };
      const prev = store.get().me;
      if (prev && haversine(prev, me) < 5 && store.get().meSource === "gps") return;
      store.set({ me, meSource: "gps", meAccuracy: Math.round(pos.coords.accuracy), geo: "watching" });
    },
    (err) => store.set({ geo: err.code === err.PERMISSION_DENIED ? "denied" : "unavailable" }),
    { enableHighAccuracy: true, maximumAge: 10_000, timeout: 30_000 },
  );
}

export function useGps(): void {
  store.set({ meSource: null });
  if (watchId !== null) navigator.geolocation.clearWatch(watchId);
  watchId = null;
  watchGps();
}

export function chooseOnMap(loc: Loc): void {
  store.set({ me: loc, meSource: "map", meAccuracy: null });
}
