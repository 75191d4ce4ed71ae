// Pieces several screens share: headings, chips, question rows, the "where am I" panel.
import { go, href, shared, store, type Route } from "./app";
import { Cleanup, h } from "./dom";
import { chooseOnMap, regionAt, regionCentre, regionName, useGps } from "./geo";
import { ago, distance, t, type Key } from "./i18n";
import type { Nearby, Question, Status } from "./types";

/** A screen's heading; focused when the screen mounts so screen readers announce it. */
export function heading(text: string, lead?: string): HTMLElement {
  return h("header", { class: "screen-head" },
    h("h1", { id: "screen-title", tabindex: -1 }, text),
    lead ? h("p", { class: "lead" }, lead) : null);
}

export function focusHeading(root: HTMLElement): void {
  const title = root.querySelector<HTMLElement>("#screen-title");
  title?.focus({ preventScroll: true });
}

export function statusChip(status: Status): HTMLElement {
  return h("span", { class: `chip status-${status}` }, t(`status_${status}` as Key));
}

export function urgentChip(): HTMLElement {
  return h("span", { class: "chip chip-urgent" }, t("urgent"));
}

export function link(route: Route, attrs: Record<string, string>, ...children: (Node | string)[]): HTMLAnchorElement {
  return h("a", { ...attrs, href: href(route) }, ...children);
}

/** A row in a list of questions, the whole row a link to the question's room. */
export function questionRow(q: Question | Nearby, extra?: Node | null): HTMLElement {
  const meta: string[] = [regionName(q.region)];
  if ("distance_m" in q && q.distance_m !== undefined) meta.push(distance(q.distance_m));
  meta.push(ago(q.created_at));
  const status = "status" in q && q.status ? q.status : null;
  const count = "answer_count" in q && q.answer_count !== undefined ? q.answer_count : null;
  return h("li", { class: "q-row", "data-question-id": q.question_id },
    link({ name: "q", id: q.question_id }, { class: "q-link" },
      h("span", { class: "q-row-top" },
        q.urgency === "urgent" ? urgentChip() : "",
        status ? statusChip(status) : "",
        count !== null ? h("span", { class: "count" }, t("q_answers", { n: count })) : "",
      ),
      h("span", { class: "q-title" }, q.title),
      h("span", { class: "q-meta" }, meta.filter(Boolean).join(" · ")),
      extra ?? "",
    ));
}

export function empty(text: string, action?: HTMLElement): HTMLElement {
  return h("div", { class: "empty" }, h("p", null, text), action ?? "");
}

/**
 * Where I am: region and source, a button back to GPS, and a list of regions as the
 * keyboard's way to do what tapping the map does.
 */
export function placePanel(cleanup: Cleanup): HTMLElement {
  const line = h("p", { class: "place-line", "aria-live": "polite" });
  const gps = h("button", { type: "button", class: "btn btn-small btn-ghost", onclick: () => useGps() }, t("geo_use_gps"));
  const select = h("select", { id: "region-pick", class: "select" });
  select.append(h("option", { value: "" }, t("map_region_none")));
  const names = shared.regions.features.map((f) => f.properties.name);
  for (const name of names) select.append(h("option", { value: name }, regionName(name)));
  select.addEventListener("change", () => {
    const f = shared.regions.features.find((r) => r.properties.name === select.value);
    if (f) chooseOnMap(regionCentre(f));
  });
  const render = () => {
    const { me, meSource, meAccuracy, geo } = store.get();
    const region = me ? regionAt(me) : null;
    let text: string;
    if (me && region) {
      const how = meSource === "gps" ? t("geo_from_gps", { m: meAccuracy ?? "?" }) : t("geo_from_map");
      text = `${t("region_of", { region: regionName(region.properties.name) })} · ${how}`;
    } else if (me) text = t("geo_outside");
    else if (geo === "denied") text = t("geo_denied");
    else if (geo === "unavailable") text = t("geo_unavailable");
    else text = t("geo_locating");
    line.textContent = text;
    line.classList.toggle("warn", !region);
    gps.hidden = meSource !== "map";
    if (region && select.value !== region.properties.name && meSource === "map") select.value = region.properties.name;
  };
  cleanup.add(store.subscribe((s, prev) => {
    if (s.me !== prev.me || s.geo !== prev.geo || s.meSource !== prev.meSource) render();
  }));
  render();
  return h("div", { class: "place" },
    line,
    h("div", { class: "place-controls" },
      h("label", { for: "region-pick", class: "visually-hidden" }, t("map_region_pick")),
      select, gps),
    h("p", { class: "hint" }, t("map_hint_tap")));
}

export function goHome(): void {
  go({ name: store.get().user?.local ? "nearby" : "ask" });
}
