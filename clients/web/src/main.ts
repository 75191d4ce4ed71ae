// dongne's web app: sign in, connect, then the shell (top bar, banners, tab bar) around one
// screen at a time. Travellers ask; locals share where they are and answer alerts.
import { onEvent, onSession, onState, openSession, sessionOpened, SessionClosed } from "./api";
import { listenForAlerts } from "./alerts";
import { href, shared, store, toast } from "./app";
import { fill, h } from "./dom";
import { report } from "./errors";
import { watchGps } from "./geo";
import { t, type Key } from "./i18n";
import * as signin from "./screens/signin";
import { shareLocation } from "./share";
import { mountShell } from "./shell";
import { armSound } from "./signal";
import type { Regions, WebConfig } from "./types";

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
  const match = /(?:^#|&)token=([^&#]+)/.exec(location.hash);
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

/** The page's language and title (with the unread count, seen on a background tab). */
function updateDocument(): void {
  document.documentElement.lang = store.get().lang;
  const unread = store.get().unread;
  document.title = `${unread > 0 ? `(${unread}) ` : ""}${t("app_name")} · ${t("app_tagline")}`;
}

async function boot(root: HTMLElement): Promise<void> {
  updateDocument();
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
    updateDocument();
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
  // Handlers go on before the first hello: the events a resume replays follow its reply at once.
  // Each hello says who I am and how many notifications are unread (replayed ones among them).
  let seenSeq = 0;
  onSession("hello", (hello) => {
    seenSeq = hello.last_seq;
    store.set({ user: hello.user, unread: hello.unread });
  });
  onSession("missed", () => store.set({ missed: true }));
  onSession("closed", (err) => {
    store.set({ ended: err.code === null ? "closed" : String(err.code) });
    if (err.code === 4001 && store.get().user) { keepToken(null); showSignIn(root, "signin_expired"); }
  });
  // A refused token is dropped, so that the retry the SDK makes at once asks token_url for a new one.
  onSession("disconnected", (d) => { if (d.code === 4001 && shared.config.token_url) keepToken(null); });
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
    const route = store.get().route;
    const here = route.name === "q" && route.id === d.question_id;
    toast(t("accepted_toast", { points: d.points, total: d.total_points }), "good",
      here ? undefined : { label: t("alert_open"), href: href({ name: "q", id: d.question_id }) });
  });
  onEvent("answer_notification", (d) => {
    const route = store.get().route;
    if (route.name === "q" && route.id === d.question_id) return;
    toast(`${t("q_new_answer_from", { nick: d.answer.author_nick })}: ${d.question_title}`, "info", { label: t("alert_open"), href: href({ name: "q", id: d.question_id }) });
  });
  listenForAlerts();
  try {
    await sessionOpened();
  } catch (err) {
    const code = err instanceof SessionClosed ? err.code : null;
    if (code === 4001) { keepToken(null); return showSignIn(root, "signin_expired"); }
    if (code === 4003) return showSignIn(root, "signin_banned");
    report(err);
    return showSignIn(root, "signin_expired");
  }
  store.set({ conn: "open" });
  armSound();
  watchGps();
  if (store.get().user?.local) shareLocation((sharing) => store.set({ sharing }));
  mountShell(root, updateDocument);
}

const root = document.getElementById("app");
if (root) void boot(root);
