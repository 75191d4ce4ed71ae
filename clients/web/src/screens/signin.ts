// No token: how to get one, and a field to paste one (development and the demo).
import { saveLang, type AppStore } from "../app";
import { h } from "../dom";
import { t, type Key } from "../i18n";
import { focusHeading } from "../ui";

export function mount(root: HTMLElement, store: AppStore, reason: Key | null = null, onToken?: (token: string) => void): () => void {
  const lang = h("button", { type: "button", class: "btn btn-small btn-ghost", lang: store.get().lang === "ko" ? "en" : "ko", "aria-label": `${t("lang_switch")}: ${t("lang_switch_label")}` }, t("lang_switch"));
  lang.addEventListener("click", () => {
    const next = store.get().lang === "ko" ? "en" : "ko";
    saveLang(next);
    store.set({ lang: next });
  });
  const field = h("input", { id: "signin-token", name: "token", type: "text", autocomplete: "off", spellcheck: "false", class: "mono" });
  const form = h("form", { class: "signin-form", id: "signin-form" },
    h("label", { for: "signin-token", class: "label" }, t("signin_paste")), field,
    h("button", { type: "submit", class: "btn btn-primary btn-block" }, t("signin_submit")));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const token = field.value.trim().replace(/^.*#token=/, "");
    if (token) onToken?.(token);
  });
  root.append(h("section", { class: "card signin", "aria-labelledby": "screen-title" },
    h("div", { class: "signin-top" }, h("div", { class: "signin-mark", "aria-hidden": "true" }, t("app_name")), lang),
    h("h1", { id: "screen-title", tabindex: -1 }, t("signin_title")),
    reason ? h("p", { class: "form-error", role: "alert" }, t(reason)) : null,
    h("p", null, t("signin_body")),
    h("p", null, t("signin_dev"), " ", h("code", null, "dongne demo")),
    form));
  focusHeading(root);
  return () => root.replaceChildren();
}
