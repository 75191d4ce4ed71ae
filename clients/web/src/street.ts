// The street map (only with `[web] tile_url`): Leaflet with the operator's raster tiles under
// Jeju's regions; positions as SVG circle markers, so no marker images are fetched.
// Loaded on demand as its own chunk; Leaflet's stylesheet is part of style.css.
// It imports nothing of the app's but types, so the app's modules stay in the entry chunk.
import * as L from "leaflet";
import type { MapOptions, MapView, Pin } from "./map";
import type { Loc, Regions } from "./types";

export interface StreetSource { tileUrl: string; attribution: string; regions: Regions; prefix: string }

/** Leaflet shows attribution as HTML: the operator's text is shown as text. */
function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

export function createStreetMap(box: HTMLElement, options: MapOptions, source: StreetSource): MapView {
  const el = document.createElement("div");
  el.className = "map-canvas";
  box.append(el);
  const regions = L.geoJSON(source.regions as unknown as GeoJSON.FeatureCollection, {
    interactive: false,
    style: () => ({ color: "#0b6b75", weight: 1.5, opacity: 0.8, fillColor: "#0b6b75", fillOpacity: 0.05 }),
  });
  const bounds = regions.getBounds();
  const map = L.map(el, {
    zoomControl: true,
    attributionControl: true,
    maxBounds: bounds.pad(0.3),
    minZoom: 8,
    maxZoom: 18,
  });
  map.attributionControl.setPrefix(false);
  const attribution = source.attribution
    ? `${escapeHtml(source.prefix)}: ${escapeHtml(source.attribution)} · Leaflet`
    : "Leaflet";
  L.tileLayer(source.tileUrl, { attribution, maxZoom: 19, detectRetina: false }).addTo(map);
  regions.addTo(map);
  const ringLayer = L.layerGroup().addTo(map);
  const pinLayer = L.layerGroup().addTo(map);
  const meLayer = L.layerGroup().addTo(map);
  const focusOn = (loc: Loc | null | undefined) => {
    if (loc) map.setView([loc.lat, loc.lng], zoomFor(options.spanKm ?? 12));
    else map.fitBounds(bounds, { padding: [8, 8] });
  };
  focusOn(options.focus);
  if (options.onTap) {
    map.on("click", (e: L.LeafletMouseEvent) => options.onTap?.({ lat: +e.latlng.lat.toFixed(5), lng: +e.latlng.lng.toFixed(5) }));
  }
  const resize = new ResizeObserver(() => map.invalidateSize());
  resize.observe(box);
  return {
    setMe(loc) {
      meLayer.clearLayers();
      ringLayer.clearLayers();
      if (!loc) return;
      if (options.rings) {
        for (const km of [5, 2]) {
          L.circle([loc.lat, loc.lng], { radius: km * 1000, color: "#0b6b75", weight: 1.5, dashArray: "6 6", fill: false, interactive: false }).addTo(ringLayer);
        }
      }
      L.circleMarker([loc.lat, loc.lng], { radius: 8, color: "#ffffff", weight: 3, fillColor: "#2563eb", fillOpacity: 1, interactive: false }).addTo(meLayer);
    },
    setPins(pins: Pin[]) {
      pinLayer.clearLayers();
      for (const pin of pins) {
        const colour = pin.kind === "urgent" ? "#c2410c" : pin.kind === "done" ? "#64748b" : "#0b6b75";
        const marker = L.circleMarker([pin.loc.lat, pin.loc.lng], { radius: 9, color: "#ffffff", weight: 2, fillColor: colour, fillOpacity: 1 });
        if (pin.onSelect) marker.on("click", () => pin.onSelect?.());
        marker.addTo(pinLayer);
      }
    },
    setFocus: focusOn,
    destroy() { resize.disconnect(); map.remove(); el.remove(); },
  };
}

/** The zoom at which about `km` fits across a phone-sized map. */
function zoomFor(km: number): number {
  return Math.max(9, Math.min(17, Math.round(Math.log2((40_075 * Math.cos((33.4 * Math.PI) / 180) * 360) / (256 * km)))));
}
