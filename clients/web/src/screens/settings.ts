// Local: how alerts reach me (`get_settings` / `update_settings`), and this device's share.
import { call } from "../api";
import { toast, type AppStore } from "../app";
import { Cleanup, h } from "../dom";
import { errorText, report } from "../errors";
import { regionAt, regionName } from "../geo";
import { t } from "../i18n";
import { chime, systemNotificationsState } from "../signal";
import type { Loc, Settings } from "../types";
import { focusHeading, heading } from "../ui";

export function mount(root: HTMLElement, store: AppStore): () => void {
  const cleanup = new Cleanup();
  let home: Loc | null = null;

  const immediate = h("input", { id: "set-immediate", type: "checkbox", class: "switch" });
  const quiet = h("input", { id: "set-quiet", type: "checkbox", class: "switch" });
  const hours = (id: string) => {
    const select = h("select", { id, class: "select" });
    for (let hr = 0; hr < 24; hr++) select.append(h("option", { value: hr }, t("hour", { h: hr })));
    return select;
  };
  const from = hours("set-quiet-from");
  const to = hours("set-quiet-to");
  const cap = h("input", { id: "set-cap", type: "number", min: 0, max: 1000, step: 1, inputmode: "numeric", class: "input-narrow" });
  const capError = h("p", { class: "form-error field-error", id: "set-cap-error" });
  const homeLine = h("p", { class: "home-line", id: "home-line" });
  const problem = h("p", { class: "form-error", role: "alert" });
  const save = h("button", { type: "submit", class: "btn btn-primary btn-block", id: "settings-save" }, t("settings_save"));
  const quietTimes = h("div", { class: "row quiet-times" },
    h("label", { for: "set-quiet-from", class: "label-inline" }, t("settings_quiet_from")), from,
    h("label", { for: "set-quiet-to", class: "label-inline" }, t("settings_quiet_to")), to);

  const showHome = () => {
    homeLine.textContent = home ? `${regionName(regionAt(home)?.properties.name)} · ${home.lat.toFixed(4)}, ${home.lng.toFixed(4)}` : t("settings_home_none");
  };
  const setHome = h("button", { type: "button", class: "btn btn-small", id: "home-set" }, t("settings_home_set"));
  setHome.addEventListener("click", () => {
    const me = store.get().me;
    if (!me || !regionAt(me)) { problem.textContent = t("ask_need_location"); return; }
    home = me;
    showHome();
    submit();
  });
  const clearHome = h("button", { type: "button", class: "btn btn-small btn-ghost" }, t("settings_home_clear"));
  clearHome.addEventListener("click", () => { home = null; showHome(); submit(); });

  const fillIn = (s: Settings) => {
    immediate.checked = s.immediate_alerts;
    quiet.checked = s.quiet_hours !== null;
    from.value = String(s.quiet_hours?.[0] ?? 22);
    to.value = String(s.quiet_hours?.[1] ?? 7);
    quietTimes.hidden = !quiet.checked;
    cap.value = String(s.max_alerts_per_hour);
    home = s.home;
    showHome();
  };
  quiet.addEventListener("change", () => { quietTimes.hidden = !quiet.checked; });
  cap.addEventListener("input", () => {
    capError.textContent = "";
    cap.removeAttribute("aria-invalid");
    cap.removeAttribute("aria-describedby");
  });

  // Nothing can be saved before the settings are known: the form sends every field, and an empty one
  // would overwrite the saved value (a cap of 0, quiet hours off).
  let loaded = false;
  const enableForm = (yes: boolean) => {
    loaded = yes;
    for (const control of [immediate, quiet, from, to, cap, setHome, clearHome, save]) control.disabled = !yes;
  };

  const submit = () => {
    if (!loaded) return;
    problem.textContent = "";
    // An empty field is no number (Number("") is 0, which would turn the alerts off); nor is what a number
    // input holds as "" when its text is not a number.
    const n = cap.value.trim() === "" ? NaN : Number(cap.value);
    if (!Number.isInteger(n) || n < 0 || n > 1000) {
      capError.textContent = t("settings_cap_invalid");
      cap.setAttribute("aria-invalid", "true");
      cap.setAttribute("aria-describedby", capError.id);
      cap.focus();
      return;
    }
    save.disabled = true;
    call("update_settings", {
      immediate_alerts: immediate.checked,
      quiet_hours: quiet.checked ? [Number(from.value), Number(to.value)] : null,
      max_alerts_per_hour: n,
      home,
    }).then((r) => { fillIn(r.settings); toast(t("settings_saved"), "good"); }, (err: unknown) => {
      report(err);
      problem.textContent = errorText(err);
    }).finally(() => { save.disabled = false; });
  };

  const form = h("form", { class: "card settings", id: "settings-form", novalidate: true },
    h("div", { class: "toggle-row" }, immediate,
      h("label", { for: "set-immediate", class: "toggle-label" }, h("strong", null, t("settings_immediate")), h("span", { class: "hint" }, t("settings_immediate_hint")))),
    h("div", { class: "toggle-row" }, quiet,
      h("label", { for: "set-quiet", class: "toggle-label" }, h("strong", null, t("settings_quiet")), h("span", { class: "hint" }, t("settings_quiet_hint")))),
    quietTimes,
    h("div", { class: "field-row" }, h("label", { for: "set-cap", class: "label" }, t("settings_cap")), cap),
    capError,
    h("div", { class: "field" },
      h("p", { class: "label", id: "home-title" }, t("settings_home")),
      h("p", { class: "hint" }, t("settings_home_hint")),
      homeLine,
      h("div", { class: "row" }, setHome, clearHome)),
    problem, save);
  form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });

  // This device: system notifications and a sound check.
  const systemState = h("span", { class: "chip", id: "system-state" });
  const enable = h("button", { type: "button", class: "btn btn-small" }, t("settings_system_enable"));
  const showSystem = () => {
    const s = systemNotificationsState();
    systemState.textContent = s === "on" ? t("settings_system_on") : s === "denied" ? t("settings_system_denied") : s === "unsupported" ? t("settings_system_unsupported") : "";
    systemState.hidden = s === "off";
    enable.hidden = s !== "off";
  };
  enable.addEventListener("click", () => { void Notification.requestPermission().then(showSystem); });
  const test = h("button", { type: "button", class: "btn btn-small btn-ghost", onclick: () => setTimeout(() => chime("urgent"), 50) }, t("settings_sound_test"));
  const device = h("section", { class: "card", "aria-labelledby": "device-title" },
    h("h2", { id: "device-title", class: "card-title" }, t("settings_system")),
    h("p", { class: "hint" }, t("settings_system_hint")),
    h("div", { class: "row" }, systemState, enable, test));
  showSystem();

  root.append(heading(t("settings_title")), h("div", { class: "layout-two" }, h("div", { class: "col" }, form), h("div", { class: "col" }, device)));
  const load = () => call("get_settings", {}).then((r) => { fillIn(r.settings); enableForm(true); problem.textContent = ""; }, (err: unknown) => {
    report(err);
    problem.textContent = errorText(err);
  });
  enableForm(false);
  quietTimes.hidden = true;
  homeLine.textContent = t("settings_loading");
  load();
  cleanup.add(store.subscribe((s, prev) => { if (!loaded && s.conn === "open" && prev.conn !== "open") load(); }));
  focusHeading(root);
  return () => cleanup.run();
}
