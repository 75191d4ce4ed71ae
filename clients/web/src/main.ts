// dongne's web app: sign in, connect, then the shell (top bar, banners, tab bar) around one
// screen at a time. Travellers ask; locals share where they are and answer alerts.
import { call, onEvent, onSession, onState, openSession, sessionOpened, SessionClosed } from "./api";
import { listenForAlerts, mountAlertLayer } from "./alerts";
import { href, parseRoute, saveLang, shared, store, toast, type Route, type RouteName } from "./app";
import { Cleanup, fill, h } from "./dom";
import { report } from "./errors";
import { watchGps } from "./geo";
import { t, type Key } from "./i18n";
import { icon, type IconName } from "./icons";
import { shareLocation } from "./share";
import { armSound } from "./signal";
import type { AppStore } from "./app";
import type { Regions, WebConfig } from "./types";
import * as ask from "./screens/ask";
import * as inbox from "./screens/inbox";
import * as mine from "./screens/mine";
import * as nearby from "./screens/nearby";
import * as profile from "./screens/profile";
import * as question from "./screens/question";
import * as settings from "./screens/settings";
import * as signin from "./screens/signin";

type Screen = { mount(root: HTMLElement, store: AppStore): () => void };
const SCREENS: Record<RouteName, Screen> = { ask, mine, inbox, q: question, nearby, profile, settings };

const TOKEN_KEY = "dongne.token";
let memoryToken: string | null = null;

// ---- sign-in

function storedToken(): string | null {
  try { return localStorage.getItem(TOKEN_KEY) ?? memoryToken; } catch { return memoryToken; }
}

function keepToken(token: string | null): void {
  memoryToken = token;
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch { /* private mode: the token lasts this page */ }
}

/** `#token=...` (never the query: it stays out of logs) is kept, then taken out of the address bar. */
function takeTokenFromFragment(): void {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!match?.[1]) return;
  keepToken(decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search);
}

function claims(token: string): { sub?: string; exp?: number } {
  try {
    const part = (token.split(".")[1] ?? "").replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)) as { sub?: string; exp?: number };
  } catch {
    return {};
  }
}

/** With `[web] token_url`, the operator's backend hands out tokens (cookies included). */
async function fetchToken(): Promise<string | null> {
  try {
    const res = await fetch(shared.config.token_url, { credentials: "include", headers: { accept: "application/json" } });
    if (!res.ok) return null;
    const body = (await res.json()) as { token?: unknown };
    return typeof body.token === "string" && body.token ? body.token : null;
  } catch {
    return null;
  }
}

async function currentToken(): Promise<string> {
  const token = storedToken();
  const exp = token ? claims(token).exp : undefined;
  if (token && (!shared.config.token_url || (exp !== undefined && exp * 1000 > Date.now() + 60_000))) return token;
  if (shared.config.token_url) {
    const fresh = await fetchToken();
    if (fresh) { keepToken(fresh); return fresh; }
  }
  return token ?? "";
}

// ---- start-up

async function getJson<T>(path: string): Promise<T> {
  const res = await fetch(path, { headers: { accept: "application/json" } });
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
  return (await res.json()) as T;
}

function setLangAttr(): void {
  document.documentElement.lang = store.get().lang;
  document.title = `${t("app_name")} · ${t("app_tagline")}`;
}

async function boot(root: HTMLElement): Promise<void> {
  setLangAttr();
  takeTokenFromFragment();
  // A sign-in link opened in a tab that has the app already: the new token takes over.
  window.addEventListener("hashchange", () => {
    if (!/(?:^#|&)token=/.test(location.hash)) return;
    takeTokenFromFragment();
    location.reload();
  });
  try {
    const [config, regions] = await Promise.all([getJson<WebConfig>("/config.json"), getJson<Regions>("/regions.geojson")]);
    shared.config = { ...shared.config, ...config };
    shared.regions = regions;
  } catch (err) {
    console.warn(err);
    fill(root, h("section", { class: "card signin" }, h("h1", { id: "screen-title" }, t("boot_failed")),
      h("button", { type: "button", class: "btn btn-primary", onclick: () => location.reload() }, t("retry"))));
    return;
  }
  let token = storedToken();
  if (!token && shared.config.token_url) {
    token = await fetchToken();
    if (token) keepToken(token);
    else return showSignIn(root, "signin_token_failed");
  }
  if (!token) return showSignIn(root, null);
  await start(root, token);
}

let signInOff: (() => void) | null = null;

function showSignIn(root: HTMLElement, reason: Key | null): void {
  signInOff?.();
  root.replaceChildren();
  const main = h("main", { class: "signin-page" });
  root.append(main);
  signin.mount(main, store, reason, (token) => { keepToken(token); location.reload(); });
  signInOff = store.subscribe((s, prev) => {
    if (s.lang === prev.lang) return;
    setLangAttr();
    showSignIn(root, reason);
  });
}

async function start(root: HTMLElement, token: string): Promise<void> {
  fill(root, h("p", { class: "boot", role: "status" }, t("conn_connecting")));
  const user = claims(token).sub ?? "anon";
  const prefix = `dongne.${user}.`;
  const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${shared.config.ws_path}`;
  openSession(url, {
    getToken: currentToken,
    storage: {
      get: (k) => { try { return localStorage.getItem(prefix + k); } catch { return null; } },
      set: (k, v) => { try { localStorage.setItem(prefix + k, v); } catch { /* the seq lasts this page */ } },
    },
  });
  onState((conn) => store.set({ conn }));
  // Each hello says how many notifications are unread; the events it replays are among them.
  let seenSeq = 0;
  onSession("hello", (hello) => {
    seenSeq = hello.last_seq;
    store.set({ unread: hello.unread });
  });
  onSession("missed", () => store.set({ missed: true }));
  onSession("closed", (err) => store.set({ ended: err.code === null ? "closed" : String(err.code) }));
  try {
    await sessionOpened();
  } catch (err) {
    const code = err instanceof SessionClosed ? err.code : null;
    if (code === 4001) { keepToken(null); return showSignIn(root, "signin_expired"); }
    if (code === 4003) return showSignIn(root, "signin_banned");
    report(err);
    return showSignIn(root, "signin_expired");
  }
  try {
    const profile = await call("get_profile", {});
    store.set({ user: profile.user, conn: "open" });
  } catch (err) {
    report(err);
  }
  // The badge: new durable events are unread; replayed ones were counted by hello already.
  for (const type of ["answer_notification", "answer_accepted_notification", "new_question_notification", "content_hidden"] as const) {
    onEvent(type, (_data, seq) => {
      if (seq !== undefined && seq > seenSeq) { seenSeq = seq; store.set({ unread: store.get().unread + 1 }); }
    });
  }
  onEvent("unread_count", (d) => store.set({ unread: d.unread }));
  onEvent("answer_accepted_notification", (d) => {
    const u = store.get().user;
    if (u) store.set({ user: { ...u, points: d.total_points } });
    toast(t("accepted_toast", { points: d.points, total: d.total_points }), "good", { label: t("alert_open"), href: href({ name: "q", id: d.question_id }) });
  });
  onEvent("answer_notification", (d) => {
    const route = store.get().route;
    if (route.name === "q" && route.id === d.question_id) return;
    toast(`${t("q_new_answer_from", { nick: d.answer.author_nick })}: ${d.question_title}`, "info", { label: t("alert_open"), href: href({ name: "q", id: d.question_id }) });
  });
  armSound();
  watchGps();
  if (store.get().user?.local) {
    listenForAlerts();
    shareLocation((sharing) => store.set({ sharing }));
  }
  mountShell(root);
}

// ---- the shell

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

function mountShell(root: HTMLElement): void {
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
  const banners = h("div", { class: "banners", role: "status", "aria-live": "polite" });
  const main = h("main", { id: "main", class: "screen" });
  const alertLayer = h("div", { class: "alert-layer", id: "alerts" });
  const toasts = h("div", { class: "toasts", id: "toasts", role: "status", "aria-live": "polite" });
  const nav = h("nav", { class: "tabbar", "aria-label": t("nav_label") });
  const brand = h("a", { class: "brand", href: href({ name: local ? "nearby" : "ask" }) },
    h("span", { class: "brand-mark", "aria-hidden": "true" }, icon("pin")), h("span", { class: "brand-name" }));
  const header = h("header", { class: "topbar" }, brand, connPill, h("span", { class: "spacer" }), points, langButton);
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
    if (s.lang !== prev.lang) { setLangAttr(); renderChrome(); showScreen(); return; }
    if (s.route !== prev.route) { renderNav(); showScreen(); }
    if (s.conn !== prev.conn || s.missed !== prev.missed || s.ended !== prev.ended) { renderConn(); renderBanners(); }
    if (s.unread !== prev.unread) renderNav();
    if (s.user?.points !== prev.user?.points) renderPoints();
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
  showScreen();
}

const root = document.getElementById("app");
if (root) void boot(root);
