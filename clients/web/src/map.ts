// The map: Jeju's regions as SVG drawn from the served GeoJSON (as /admin draws them), my
// position with 2 km / 5 km rings, and pins for questions. With `[web] tile_url` set, a
// Leaflet street map (a lazily loaded chunk) is drawn under the same regions instead.
import { shared, store } from "./app";
import { svg } from "./dom";
import { regionAt, ringsOf } from "./geo";
import { t } from "./i18n";
import type { Loc } from "./types";

export interface Pin { id: string; loc: Loc; kind: "question" | "urgent" | "done"; label: string; onSelect?: () => void }

export interface MapOptions {
  /** Called with a place inside the service area that was tapped. */
  onTap?: (loc: Loc) => void;
  /** Centre on this place at `spanKm` across, instead of the whole island. */
  focus?: Loc | null;
  spanKm?: number;
  /** Draw 2 km and 5 km rings around my position. */
  rings?: boolean;
}

export interface MapView {
  setMe(loc: Loc | null): void;
  setPins(pins: Pin[]): void;
  setFocus(loc: Loc | null): void;
  destroy(): void;
}

export function mountMap(container: HTMLElement, options: MapOptions): MapView {
  return shared.config.tile_url ? streetMap(container, options) : regionMap(container, options);
}

// ---- the street map, loaded on demand

function streetMap(container: HTMLElement, options: MapOptions): MapView {
  const box = document.createElement("div");
  box.className = "map map-street";
  box.setAttribute("role", "region");
  box.setAttribute("aria-label", t("map_label"));
  const note = document.createElement("p");
  note.className = "map-loading";
  note.textContent = t("map_loading");
  box.append(note);
  container.append(box);
  let me: Loc | null = null, pins: Pin[] = [], focus = options.focus ?? null, view: MapView | null = null, gone = false;
  import("./street").then((m) => {
    if (gone) return;
    note.remove();
    view = m.createStreetMap(box, { ...options, focus }, {
      tileUrl: shared.config.tile_url, attribution: shared.config.tile_attribution,
      regions: shared.regions, prefix: t("map_attribution_prefix"),
    });
    view.setMe(me);
    view.setPins(pins);
  }).catch((err: unknown) => {
    console.error("the street map did not load", err);
    note.textContent = t("err_unknown");
  });
  return {
    setMe(loc) { me = loc; view?.setMe(loc); },
    setPins(list) { pins = list; view?.setPins(list); },
    setFocus(loc) { focus = loc; view?.setFocus(loc); },
    destroy() { gone = true; view?.destroy(); box.remove(); },
  };
}

// ---- the SVG map of the regions

const WIDTH = 1000;
const PAD = 16;
const KM_PER_DEG_LAT = 111.32;

type Box = [number, number, number, number];

interface Inset { box: Box; frame: Box; project(lng: number, lat: number): [number, number] }

interface Projection {
  width: number;
  height: number;
  unitsPerKm: number;
  insets: Inset[];
  project(lng: number, lat: number): [number, number];
  invert(x: number, y: number): Loc;
}

function bboxOf(rings: number[][][]): Box {
  const b: Box = [Infinity, Infinity, -Infinity, -Infinity];
  for (const ring of rings) for (const [lng = 0, lat = 0] of ring) {
    b[0] = Math.min(b[0], lng); b[1] = Math.min(b[1], lat); b[2] = Math.max(b[2], lng); b[3] = Math.max(b[3], lat);
  }
  return b;
}

const union = (boxes: Box[]): Box => boxes.reduce<Box>(
  (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[2], b[2]), Math.max(a[3], b[3])],
  [Infinity, Infinity, -Infinity, -Infinity]);

let cached: Projection | null = null;

/** Equirectangular, x scaled by cos(lat0); a region far from the others (Chuja) goes in an inset, top left. */
function projection(): Projection {
  if (cached) return cached;
  const regions = shared.regions.features.map((f) => ({ f, bbox: bboxOf(ringsOf(f)) }));
  const isOutlier = (r: (typeof regions)[number]) => {
    const rest = union(regions.filter((o) => o !== r).map((o) => o.bbox));
    const k = Math.cos(rad((rest[1] + rest[3]) / 2));
    const size = Math.max((rest[2] - rest[0]) * k, rest[3] - rest[1]);
    const dx = Math.max(0, rest[0] - r.bbox[2], r.bbox[0] - rest[2]) * k;
    const dy = Math.max(0, rest[1] - r.bbox[3], r.bbox[1] - rest[3]);
    return Math.hypot(dx, dy) > 0.25 * size;
  };
  let outliers = regions.length > 3 ? regions.filter(isOutlier) : [];
  if (outliers.length > 2) outliers = [];
  const main = union(regions.filter((r) => !outliers.includes(r)).map((r) => r.bbox));
  const k = Math.cos(rad((main[1] + main[3]) / 2));
  const scale = (WIDTH - 2 * PAD) / ((main[2] - main[0]) * k || 1);
  const height = (main[3] - main[1]) * scale + 2 * PAD;
  const insets: Inset[] = [];
  let left = 6;
  for (const r of outliers) {
    const m = 0.012;
    const box: Box = [r.bbox[0] - m, r.bbox[1] - m, r.bbox[2] + m, r.bbox[3] + m];
    const w = (box[2] - box[0]) * k * scale, hh = (box[3] - box[1]) * scale;
    const x0 = left, y0 = 6;
    left += w + 6;
    insets.push({ box, frame: [x0, y0, w, hh], project: (lng, lat) => [x0 + (lng - box[0]) * k * scale, y0 + (box[3] - lat) * scale] });
  }
  const near = (b: Box, lng: number, lat: number) => lng >= b[0] - 0.05 && lng <= b[2] + 0.05 && lat >= b[1] - 0.05 && lat <= b[3] + 0.05;
  cached = {
    width: WIDTH, height, insets,
    unitsPerKm: scale / KM_PER_DEG_LAT,
    project(lng, lat) {
      for (const inset of insets) if (near(inset.box, lng, lat)) return inset.project(lng, lat);
      return [PAD + (lng - main[0]) * k * scale, PAD + (main[3] - lat) * scale];
    },
    invert(x, y) {
      for (const { frame: [x0, y0, w, hh], box } of insets) {
        if (x >= x0 && x <= x0 + w && y >= y0 && y <= y0 + hh) return { lng: box[0] + (x - x0) / (k * scale), lat: box[3] - (y - y0) / scale };
      }
      return { lng: main[0] + (x - PAD) / (k * scale), lat: main[3] - (y - PAD) / scale };
    },
  };
  return cached;
}

function rad(d: number): number { return (d * Math.PI) / 180; }

function pathData(rings: number[][][], p: Projection): string {
  return rings.map((ring) => ring.map(([lng = 0, lat = 0], i) => {
    const [x, y] = p.project(lng, lat);
    return `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
  }).join("") + "Z").join("");
}

function labelPoint(rings: number[][][], p: Projection): [number, number] {
  let best: { area: number; x: number; y: number } | null = null;
  for (const ring of rings) {
    const pts = ring.map(([lng = 0, lat = 0]) => p.project(lng, lat));
    let a = 0, cx = 0, cy = 0;
    for (let i = 0; i < pts.length - 1; i++) {
      const [x0, y0] = pts[i] as [number, number];
      const [x1, y1] = pts[i + 1] as [number, number];
      const f = x0 * y1 - x1 * y0;
      a += f; cx += (x0 + x1) * f; cy += (y0 + y1) * f;
    }
    if (a !== 0 && (!best || Math.abs(a) > best.area)) best = { area: Math.abs(a), x: cx / (3 * a), y: cy / (3 * a) };
  }
  return best ? [best.x, best.y] : [0, 0];
}

function regionMap(container: HTMLElement, options: MapOptions): MapView {
  const p = projection();
  const root = svg("svg", { class: "map map-regions", role: "img", "aria-label": t("map_label"), preserveAspectRatio: "xMidYMid meet" });
  if (options.onTap) root.classList.add("tappable");
  const sea = svg("rect", { class: "sea", x: -5000, y: -5000, width: 10000 + WIDTH, height: 10000 + p.height });
  const frames = svg("g", { class: "insets" });
  for (const inset of p.insets) {
    const [x, y, w, hh] = inset.frame;
    frames.append(svg("rect", { class: "inset-frame", x, y, width: w, height: hh, rx: 4 }));
  }
  const shapes = svg("g", { class: "regions" });
  const labels = svg("g", { class: "labels", "aria-hidden": "true" });
  const byName = new Map<string, SVGPathElement>();
  const lang = store.get().lang;
  for (const f of shared.regions.features) {
    const rings = ringsOf(f);
    const shape = svg("path", { class: "region", d: pathData(rings, p), "fill-rule": "evenodd", "data-region": f.properties.name });
    shapes.append(shape);
    byName.set(f.properties.name, shape);
    const [x, y] = labelPoint(rings, p);
    const name = lang === "ko" ? (f.properties.name_ko ?? f.properties.name).replace(/\s*동지역$/, "") : f.properties.name;
    labels.append(svg("text", { class: "region-label", x: x.toFixed(1), y: y.toFixed(1), "text-anchor": "middle" }, name));
  }
  const rings = svg("g", { class: "rings" });
  const pinLayer = svg("g", { class: "pins" });
  const meLayer = svg("g", { class: "me" });
  root.append(sea, frames, shapes, labels, rings, pinLayer, meLayer);
  container.append(root);

  let me: Loc | null = null;
  let pins: Pin[] = [];
  let focus = options.focus ?? null;
  let unitsPerPx = 1;

  const setViewBox = () => {
    if (focus) {
      // Without streets a close-up is an empty field: show at least a stretch of coast and a label.
      const span = Math.max(options.spanKm ?? 22, 22) * p.unitsPerKm;
      const [x, y] = p.project(focus.lng, focus.lat);
      const hSpan = span * 0.75;
      root.setAttribute("viewBox", `${(x - span / 2).toFixed(1)} ${(y - hSpan / 2).toFixed(1)} ${span.toFixed(1)} ${hSpan.toFixed(1)}`);
    } else {
      root.setAttribute("viewBox", `0 0 ${p.width} ${p.height.toFixed(0)}`);
    }
    measure();
  };

  // Sizes in screen pixels whatever the zoom: labels, dots and strokes follow the rendered size.
  const measure = () => {
    const vb = root.viewBox.baseVal;
    const w = root.clientWidth || container.clientWidth || 360;
    const hPx = root.clientHeight || w * 0.6;
    unitsPerPx = vb && vb.width ? Math.max(vb.width / w, vb.height / hPx) : 1;
    root.style.setProperty("--u", String(unitsPerPx));
    for (const label of labels.children) label.setAttribute("font-size", (11 * unitsPerPx).toFixed(2));
    shapes.setAttribute("stroke-width", (1 * unitsPerPx).toFixed(2));
    drawMe();
    drawPins();
  };

  const drawMe = () => {
    meLayer.replaceChildren();
    rings.replaceChildren();
    for (const shape of byName.values()) shape.classList.remove("here");
    if (!me) return;
    const [x, y] = p.project(me.lng, me.lat);
    const here = regionAt(me);
    if (here) byName.get(here.properties.name)?.classList.add("here");
    if (options.rings) {
      for (const km of [5, 2]) {
        rings.append(svg("circle", { class: `ring ring-${km}`, cx: x.toFixed(1), cy: y.toFixed(1), r: (km * p.unitsPerKm).toFixed(1), "stroke-width": (1.5 * unitsPerPx).toFixed(2) }));
      }
    }
    meLayer.append(
      svg("circle", { class: "me-halo", cx: x.toFixed(1), cy: y.toFixed(1), r: (14 * unitsPerPx).toFixed(2) }),
      svg("circle", { class: "me-dot", cx: x.toFixed(1), cy: y.toFixed(1), r: (6.5 * unitsPerPx).toFixed(2), "stroke-width": (2.5 * unitsPerPx).toFixed(2) }, svg("title", null, t("map_me"))),
    );
  };

  const drawPins = () => {
    pinLayer.replaceChildren();
    for (const pin of pins) {
      const [x, y] = p.project(pin.loc.lng, pin.loc.lat);
      const dot = svg("circle", {
        class: `pin pin-${pin.kind}`, cx: x.toFixed(1), cy: y.toFixed(1), r: (8 * unitsPerPx).toFixed(2),
        "stroke-width": (2 * unitsPerPx).toFixed(2), "data-pin": pin.id,
      }, svg("title", null, pin.label));
      if (pin.onSelect) {
        dot.classList.add("selectable");
        dot.addEventListener("click", (e) => { e.stopPropagation(); pin.onSelect?.(); });
      }
      pinLayer.append(dot);
    }
  };

  let down: { x: number; y: number } | null = null;
  const onDown = (e: PointerEvent) => { down = { x: e.clientX, y: e.clientY }; };
  const onUp = (e: PointerEvent) => {
    if (!options.onTap || !down || Math.hypot(e.clientX - down.x, e.clientY - down.y) > 8) return;
    down = null;
    const ctm = root.getScreenCTM();
    if (!ctm) return;
    const pt = new DOMPoint(e.clientX, e.clientY).matrixTransform(ctm.inverse());
    const loc = p.invert(pt.x, pt.y);
    if (regionAt(loc)) options.onTap({ lat: +loc.lat.toFixed(5), lng: +loc.lng.toFixed(5) });
  };
  root.addEventListener("pointerdown", onDown);
  root.addEventListener("pointerup", onUp);
  const resize = new ResizeObserver(() => measure());
  resize.observe(root);
  setViewBox();

  return {
    setMe(loc) { me = loc; drawMe(); },
    setPins(list) { pins = list; drawPins(); },
    setFocus(loc) { focus = loc; setViewBox(); },
    destroy() { resize.disconnect(); root.remove(); },
  };
}
