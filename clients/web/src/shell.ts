// The frame around every screen: the top bar (connection, points, language), banners
// (reconnecting, missed notifications, a session that ended), the tab bar, the local's
// alert card and toasts. One screen is mounted at a time, by route.
import { href, parseRoute, saveLang, store, type Route, type RouteName } from "./app";
import type { AppStore } from "./app";
import { mountAlertLayer } from "./alerts";
import { Cleanup, h } from "./dom";
import { t, type Key } from "./i18n";
import { icon, type IconName } from "./icons";
import * as ask from "./screens/ask";
import * as inbox from "./screens/inbox";
import * as mine from "./screens/mine";
import * as nearby from "./screens/nearby";
import * as profile from "./screens/profile";
import * as question from "./screens/question";
import * as settings from "./screens/settings";

type Screen = { mount(root: HTMLElement, store: AppStore): () => void };
const SCREENS: Record<RouteName, Screen> = { ask, mine, inbox, q: question, nearby, profile, settings };

const TABS: Record<"traveller" | "local", { name: RouteName; label: Key; icon: IconName }[]> = {
  traveller: [
    { name: "ask", label: "nav_ask", icon: "ask" },
    { name: "mine", label: "nav_mine", icon: "list" },
    { name: "inbox", label: "nav_inbox", icon: "bell" },
  ],
  local: [
    { name: "nearby", label: "nav_nearby", icon: "pin" },
    { name: "inbox", label: "nav_inbox", icon: "bell" },
    { name: "profile", label: "nav_profile", icon: "user" },
    { name: "settings", label: "nav_settings", icon: "gear" },
  ],
};

export function mountShell(root: HTMLElement, updateDocument: () => void, signOut: () => void): void {
  const shell = new Cleanup();
  let unmountScreen: (() => void) | null = null;
  const local = !!store.get().user?.local;

  const connPill = h("span", { class: "conn", id: "conn-state" });
  const points = h("a", { class: "points-chip", id: "points", href: href({ name: "profile" }), hidden: !local });
  const langButton = h("button", { type: "button", class: "btn btn-small btn-ghost lang", id: "lang-switch" });
  langButton.addEventListener("click", () => {
    const lang = store.get().lang === "ko" ? "en" : "ko";
    saveLang(lang);
    store.set({ lang });
  });
  // Who this tab is signed in as (two tabs may be two people), and the way out.
  const userName = h("span", { class: "user-name", id: "user-nick" });
  const userButton = h("button", { type: "button", class: "btn btn-small btn-ghost user-chip", id: "user-menu", "aria-expanded": "false", "aria-controls": "user-panel" },
    icon("user"), userName);
  const signOutButton = h("button", { type: "button", class: "btn btn-small", id: "sign-out", onclick: signOut });
  const userLine = h("p", { class: "user-line" });
  const userPanel = h("div", { class: "user-panel card", id: "user-panel", hidden: true }, userLine, signOutButton);
  const showUserPanel = (open: boolean) => {
    userPanel.hidden = !open;
    userButton.setAttribute("aria-expanded", String(open));
  };
  userButton.addEventListener("click", () => showUserPanel(userPanel.hidden));
  // Closed as menus are: Escape (focus back on its button), a click or tap outside it, another screen.
  shell.listen(document, "keydown", (e) => {
    if (e.key !== "Escape" || userPanel.hidden) return;
    showUserPanel(false);
    userButton.focus();
  });
  shell.listen(document, "pointerdown", (e) => {
    if (!userPanel.hidden && e.target instanceof Node && !userPanel.contains(e.target) && !userButton.contains(e.target)) showUserPanel(false);
  });
  const banners = h("div", { class: "banners", role: "status", "aria-live": "polite" });
  const main = h("main", { id: "main", class: "screen" });
  const alertLayer = h("div", { class: "alert-layer", id: "alerts" });
  const toasts = h("div", { class: "toasts", id: "toasts", role: "status", "aria-live": "polite" });
  const nav = h("nav", { class: "tabbar", "aria-label": t("nav_label") });
  const brand = h("a", { class: "brand", href: href({ name: local ? "nearby" : "ask" }) },
    h("span", { class: "brand-mark", "aria-hidden": "true" }, icon("pin")), h("span", { class: "brand-name" }));
  const header = h("header", { class: "topbar" }, brand, connPill, h("span", { class: "spacer" }), points, userButton, langButton, userPanel);
  root.replaceChildren(header, banners, main, alertLayer, toasts, nav);
  shell.add(mountAlertLayer(alertLayer));

  const renderChrome = () => {
    const s = store.get();
    (brand.lastChild as HTMLElement).textContent = t("app_name");
    brand.setAttribute("aria-label", `${t("app_name")}: ${t("app_tagline")}`);
    langButton.textContent = t("lang_switch");
    langButton.setAttribute("aria-label", `${t("lang_switch")}: ${t("lang_switch_label")}`);
    langButton.setAttribute("lang", s.lang === "ko" ? "en" : "ko");
    nav.setAttribute("aria-label", t("nav_label"));
    renderConn();
    renderUser();
    renderPoints();
    renderNav();
    renderBanners();
  };

  const renderConn = () => {
    const { conn } = store.get();
    connPill.dataset.state = conn;
    connPill.title = conn === "open" ? t("conn_open") : conn === "reconnecting" ? t("conn_reconnecting") : conn === "closed" ? t("conn_closed") : t("conn_connecting");
    connPill.textContent = conn === "open" ? t("conn_open") : conn === "reconnecting" ? t("conn_connecting") : conn === "closed" ? t("conn_closed") : t("conn_connecting");
  };

  const renderUser = () => {
    const user = store.get().user;
    const nick = user?.nick || user?.user_id || "";
    userName.textContent = nick;
    userButton.setAttribute("aria-label", t("user_menu", { nick }));
    userLine.textContent = `${t("user_menu", { nick })} · ${t(user?.local ? "role_local" : "role_traveller")}`;
    signOutButton.textContent = t("sign_out");
  };

  const renderPoints = () => {
    const n = store.get().user?.points ?? 0;
    points.textContent = "";
    points.append(icon("star"), h("span", { id: "points-value" }, t("points_chip", { n })));
    points.setAttribute("aria-label", t("points_label", { n }));
  };

  const renderNav = () => {
    const { route, unread } = store.get();
    nav.replaceChildren(...TABS[local ? "local" : "traveller"].map((tab) => {
      const current = route.name === tab.name;
      const a = h("a", { class: "tab", href: href({ name: tab.name }), "data-tab": tab.name, ...(current ? { "aria-current": "page" } : {}) },
        icon(tab.icon), h("span", { class: "tab-label" }, t(tab.label)));
      if (tab.name === "inbox" && unread > 0) {
        a.append(h("span", { class: "badge", id: "unread-badge", "aria-hidden": "true" }, unread > 99 ? "99+" : String(unread)),
          h("span", { class: "visually-hidden" }, t("unread_badge", { n: unread })));
      }
      return a;
    }));
  };

  const renderBanners = () => {
    const { conn, missed } = store.get();
    banners.replaceChildren();
    if (conn === "reconnecting" || (conn === "connecting" && store.get().user)) {
      banners.append(h("div", { class: "banner banner-warn", id: "reconnecting" }, h("span", { class: "spinner", "aria-hidden": "true" }),
        navigator.onLine === false ? t("conn_offline") : t("conn_reconnecting")));
    } else if (conn === "closed") {
      const ended = store.get().ended;
      const why = ended === "4003" ? t("close_4003") : ended === "4008" ? t("close_4008") : ended && ended !== "closed" ? t("close_other", { code: ended }) : t("conn_closed");
      banners.append(h("div", { class: "banner banner-error", id: "closed" }, why,
        h("button", { type: "button", class: "btn btn-small", onclick: () => location.reload() }, t("reload"))));
    }
    if (missed) {
      banners.append(h("div", { class: "banner banner-info", id: "missed" }, t("missed_notice"),
        h("a", { class: "btn btn-small", href: href({ name: "inbox" }), onclick: () => store.set({ missed: false }) }, t("missed_open")),
        h("button", { type: "button", class: "btn btn-small btn-ghost", onclick: () => store.set({ missed: false }) }, t("dismiss"))));
    }
  };

  const renderToasts = () => {
    toasts.replaceChildren(...store.get().toasts.map((toastItem) => h("div", { class: `toast toast-${toastItem.kind}` },
      h("span", null, toastItem.text),
      toastItem.action ? h("a", { href: toastItem.action.href, class: "toast-action" }, toastItem.action.label) : "")));
  };

  const showScreen = () => {
    unmountScreen?.();
    main.replaceChildren();
    const route = store.get().route;
    const screen = SCREENS[route.name];
    main.dataset.screen = route.name;
    unmountScreen = screen.mount(main, store);
    window.scrollTo(0, 0);
  };

  shell.add(store.subscribe((s, prev) => {
    if (s.lang !== prev.lang) { updateDocument(); renderChrome(); showScreen(); return; }
    if (s.route !== prev.route) { showUserPanel(false); renderNav(); showScreen(); }
    if (s.conn !== prev.conn || s.missed !== prev.missed || s.ended !== prev.ended) { renderConn(); renderBanners(); }
    if (s.unread !== prev.unread) { renderNav(); updateDocument(); }
    if (s.user?.points !== prev.user?.points) renderPoints();
    if (s.user?.nick !== prev.user?.nick || s.user?.user_id !== prev.user?.user_id) renderUser();
    if (s.toasts !== prev.toasts) renderToasts();
  }));
  const onHash = () => {
    if (/(?:^#|&)token=/.test(location.hash)) return;  // a sign-in link: see boot()
    const route: Route = parseRoute(location.hash, local);
    const cur = store.get().route;
    if (route.name !== cur.name || route.id !== cur.id) store.set({ route });
  };
  shell.listen(window, "hashchange", onHash);
  shell.listen(window, "online", renderBanners);
  shell.listen(window, "offline", renderBanners);
  store.set({ route: parseRoute(location.hash, local) });
  renderChrome();
  renderToasts();
  showScreen();
}

