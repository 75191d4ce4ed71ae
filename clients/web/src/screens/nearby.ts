// Local: my shared position, and the open questions around it (`nearby_questions`, kept
// fresh by the server's `nearby_questions` event whenever I move).
import { call, onEvent } from "../api";
import { go, type AppStore } from "../app";
import { Cleanup, fill, h } from "../dom";
import { report } from "../errors";
import { chooseOnMap, regionAt, regionName } from "../geo";
import { t } from "../i18n";
import { icon } from "../icons";
import { mountMap } from "../map";
import { chime, onSoundReady, soundReady, unlockSound } from "../signal";
import type { Nearby } from "../types";
import { empty, focusHeading, heading, placePanel, questionRow } from "../ui";

export function mount(root: HTMLElement, store: AppStore): () => void {
  const cleanup = new Cleanup();
  let items: Nearby[] = [];

  const live = h("p", { class: "live-state", id: "sharing", role: "status" });
  // Until the first tap a page may neither sound nor vibrate: offer that tap.
  const sound = h("button", { type: "button", class: "btn btn-small sound-on", id: "sound-on", hidden: soundReady() },
    icon("bell"), t("nearby_sound_on"));
  sound.addEventListener("click", () => { unlockSound(); setTimeout(() => chime("normal"), 60); });
  cleanup.add(onSoundReady(() => { sound.hidden = true; }));
  const mapBox = h("div", { class: "map-box" });
  const list = h("ul", { class: "q-list", id: "nearby-questions", "aria-labelledby": "nearby-list-title" });

  root.append(
    heading(t("nearby_title"), t("nearby_sharing")),
    h("div", { class: "layout-two" },
      h("div", { class: "col" }, h("section", { class: "card map-card", "aria-label": t("map_label") }, h("div", { class: "map-card-head" }, live, sound), mapBox, placePanel(cleanup))),
      h("div", { class: "col" }, h("section", { class: "card list-card", "aria-labelledby": "nearby-list-title" },
        h("h2", { id: "nearby-list-title", class: "card-title" }, t("nearby_title")), list))),
  );
  const map = mountMap(mapBox, { onTap: chooseOnMap, rings: true, focus: store.get().me, spanKm: 10 });
  cleanup.add(() => map.destroy());

  const renderLive = () => {
    const s = store.get().sharing;
    const on = !!s?.live && store.get().conn === "open";  // while reconnecting, no alert can arrive
    live.dataset.live = String(on);
    // A place tapped on the map is where alerts are sent for, but it is not the phone's position: say so.
    const chosen = store.get().meSource === "map";
    live.dataset.source = chosen ? "map" : "gps";
    live.textContent = on ? `${t(chosen ? "nearby_live_map" : "nearby_live")}${s?.region ? ` · ${regionName(s.region)}` : ""}`
      : s?.error === "outside_service_area" ? t("geo_outside") : t("nearby_not_live");
  };

  const render = () => {
    const me = store.get().me;
    if (!me || !regionAt(me)) fill(list, h("li", null, empty(t("nearby_need_location"))));
    else if (!items.length) fill(list, h("li", null, empty(t("nearby_empty"))));
    else fill(list, ...items.map((q) => questionRow(q)));
    map.setPins(items.map((q) => ({
      id: q.question_id, loc: q.location, kind: q.urgency === "urgent" ? "urgent" : "question", label: q.title,
      onSelect: () => go({ name: "q", id: q.question_id }),
    })));
  };

  let pending: ReturnType<typeof setTimeout> | null = null;
  const load = () => {
    pending = null;
    const me = store.get().me;
    if (!me || !regionAt(me)) { render(); return; }
    call("nearby_questions", { location: me }).then((r) => { items = r.questions; render(); }, report);
  };
  const soon = () => { if (!pending) pending = setTimeout(load, 300); };
  cleanup.add(() => { if (pending) clearTimeout(pending); });

  cleanup.add(onEvent("nearby_questions", (d) => { items = d.questions; render(); }));
  cleanup.add(onEvent("new_question_notification", soon));
  cleanup.add(store.subscribe((s, prev) => {
    if (s.me !== prev.me) {
      map.setMe(s.me);
      if (!prev.me && s.me) map.setFocus(s.me);
      soon();
    }
    if (s.sharing !== prev.sharing || s.conn !== prev.conn || s.meSource !== prev.meSource) renderLive();
    if (s.conn === "open" && prev.conn === "reconnecting") soon();
  }));
  cleanup.timer(() => { if (store.get().conn === "open") load(); }, 60_000);
  map.setMe(store.get().me);
  renderLive();
  load();
  focusHeading(root);
  return () => cleanup.run();
}
