// dongne's web app: sign in, connect, then the shell (top bar, banners, tab bar) around one
// screen at a time. Travellers ask; locals share where they are and answer alerts.
import { DURABLE_EVENTS, onEvent, onSession, onState, openSession, sessionOpened, SessionClosed } from "./api";
import { listenForAlerts } from "./alerts";
import { href, shared, store, toast } from "./app";
import { fill, h } from "./dom";
import { report } from "./errors";
import { watchGps } from "./geo";
import { t, type Key } from "./i18n";
import * as signin from "./screens/signin";
import { shareLocation } from "./share";
import { mountShell } from "./shell";
import { armSound, registerWorker } from "./signal";
import type { Regions, WebConfig } from "./types";

const TOKEN_KEY = "dongne.token";
const SIGNED_OUT_KEY = "dongne.signed_out";

// ---- sign-in
//
// Each tab has its own token: in memory, and in sessionStorage so that a reload keeps it. Every
// reconnect uses the tab's token, never localStorage's, which all tabs of the profile share: a
// tab signed in as one user must not come back as the user another tab signed in as meanwhile.
// localStorage keeps the last link's token only to sign in a new tab. Tokens from `[web]
// token_url` are kept in memory only (the operator's cookie gets a fresh one at each load).

let tabToken: string | null = null;

function readTabToken(): string | null {
  if (tabToken || shared.config.token_url) return tabToken;
  try { tabToken = sessionStorage.getItem(TOKEN_KEY); } catch { /* no sessionStorage: memory only */ }
  return tabToken;
}

/** The token a new tab starts with: the tab's own, or else the last sign-in link's. */
function seedToken(): string | null {
  const own = readTabToken();
  if (own) return own;
  if (shared.config.token_url || signedOut()) return null;
  try {
    const seed = localStorage.getItem(TOKEN_KEY);
    if (seed) keepToken(seed, false);
    return seed;
  } catch { return null; }
}

/** This tab's token from now on; `shareWithNewTabs`: also the one new tabs start with. */
function keepToken(token: string | null, shareWithNewTabs = !shared.config.token_url): void {
  const previous = tabToken;
  tabToken = token;
  if (!token && shareWithNewTabs && previous) {
    // A refused token: new tabs must not start with it either.
    try { if (localStorage.getItem(TOKEN_KEY) === previous) localStorage.removeItem(TOKEN_KEY); } catch { /* nothing kept */ }
  }
  try {
    // token_url's tokens stay in memory: the operator's cookie gets a fresh one at each load.
    if (token && !shared.config.token_url) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    if (token) sessionStorage.removeItem(SIGNED_OUT_KEY);
  } catch { /* the token lasts this page */ }
  if (!shareWithNewTabs) return;
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
  } catch { /* private mode */ }
}

function signedOut(): boolean {
  try { return sessionStorage.getItem(SIGNED_OUT_KEY) === "1"; } catch { return false; }
}

/** Sign out: this tab forgets its token, and new tabs stop starting with it. */
function signOut(): void {
  const mine = readTabToken();
  keepToken(null, false);
  try {
    sessionStorage.setItem(SIGNED_OUT_KEY, "1");
    if (mine && localStorage.getItem(TOKEN_KEY) === mine) localStorage.removeItem(TOKEN_KEY);
  } catch { /* nothing kept */ }
  location.reload();
}

/** The token in a `#token=...` link (never the query: it stays out of logs), taken out of the address bar. */
function takeTokenFromFragment(): string | null {
  const match = /(?:^#|&)token=([^&#]*)/.exec(location.hash);
  if (!match) return null;
  history.replaceState(null, "", location.pathname + location.search);
  try {
    return decodeURIComponent(match[1] ?? "") || null;
  } catch {
    return null; // a malformed link: ignored
  }
}

function claims(token: string): { sub?: string; exp?: number; nick?: string } {
  try {
    const part = (token.split(".")[1] ?? "").replace(/-/g, "+").replace(/_/g, "/");
    const json = new TextDecoder().decode(Uint8Array.from(atob(part), (c) => c.charCodeAt(0)));
    return JSON.parse(json) as { sub?: string; exp?: number; nick?: string };
  } catch {
    return {};
  }
}

function who(token: string): string {
  const c = claims(token);
  return c.nick || c.sub || "?";
}

/**
 * A sign-in link's token. With `[web] token_url` the operator signs people in and links are
 * ignored (a link would let anyone sign a victim into the link maker's account). A token of
 * another user than the tab's replaces it only if the person says so, seeing both names.
 */
async function offerToken(token: string): Promise<boolean> {
  if (shared.config.token_url) return false;
  const current = readTabToken();
  const sub = claims(token).sub;
  if (current && current !== token && claims(current).sub !== sub) {
    if (!(await askSwitch(who(current), who(token)))) return false;
  }
  keepToken(token);
  return true;
}

/** A dialog over the page: switch to `next`, or stay `current`. */
function askSwitch(current: string, next: string): Promise<boolean> {
  return new Promise((resolve) => {
    const prev = document.activeElement as HTMLElement | null;
    const done = (yes: boolean) => { overlay.remove(); prev?.focus?.(); resolve(yes); };
    const yes = h("button", { type: "button", class: "btn btn-primary btn-block", id: "switch-yes", onclick: () => done(true) }, t("switch_yes", { next }));
    const no = h("button", { type: "button", class: "btn btn-block", id: "switch-no", onclick: () => done(false) }, t("switch_no", { current }));
    const overlay = h("div", { class: "overlay", id: "switch-account" },
      h("section", { class: "card dialog", role: "alertdialog", "aria-modal": "true", "aria-labelledby": "switch-title", "aria-describedby": "switch-body" },
        h("h2", { id: "switch-title" }, t("switch_title")),
        h("p", { id: "switch-body" }, t("switch_body", { current, next })),
        no, yes));
    // Escape keeps the current user; Tab stays within the two buttons.
    overlay.addEventListener("keydown", (e) => {
      if (e.key === "Escape") done(false);
      else if (e.key === "Tab") { e.preventDefault(); (document.activeElement === no ? yes : no).focus(); }
    });
    document.body.append(overlay);
    no.focus();
  });
}

/**
 * With `[web] token_url`, the operator's backend hands out tokens (cookies included). A failure
 * throws: the SDK counts it as a failed attempt and tries again after a backoff, rather than
 * saying hello with a stale token.
 */
async function fetchToken(): Promise<string> {
  const res = await fetch(shared.config.token_url, { credentials: "include", headers: { accept: "application/json" } });
  if (!res.ok) throw new Error(`token_url: HTTP ${res.status}`);
  const body = (await res.json()) as { token?: unknown };
  if (typeof body.token !== "string" || !body.token) throw new Error("token_url: no token in the answer");
  return body.token;
}

async function currentToken(): Promise<string> {
  const token = readTabToken();
  if (!shared.config.token_url) {
    if (!token) throw new Error("signed out");
    return token;
  }
  const exp = token ? claims(token).exp : undefined;
  if (token && exp !== undefined && exp * 1000 > Date.now() + 60_000) return token;
  const fresh = await fetchToken();
  keepToken(fresh);
  return fresh;
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
  const linked = takeTokenFromFragment();
  // A sign-in link opened in a tab that has the app already: the new token may take over.
  window.addEventListener("hashchange", () => {
    if (!/(?:^#|&)token=/.test(location.hash)) return;
    const token = takeTokenFromFragment();
    if (token && token !== readTabToken()) void offerToken(token).then((taken) => { if (taken) location.reload(); });
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
  if (linked) await offerToken(linked);
  let token = seedToken();
  if (!token && shared.config.token_url && !signedOut()) {
    try {
      token = await fetchToken();
      keepToken(token);
    } catch (err) {
      console.warn(err);
      return showSignIn(root, "signin_token_failed");
    }
  }
  if (!token) return showSignIn(root, signedOut() ? "signin_signed_out" : null);
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
  // token_url handed out another user's token (the operator's sign-in changed): the screens,
  // alerts and rooms on show were the previous user's, so start again as the new one.
  onSession("user_changed", () => location.reload());
  onSession("closed", (err) => {
    store.set({ ended: err.code === null ? "closed" : String(err.code) });
    if (err.code === 4001 && store.get().user) { keepToken(null); showSignIn(root, "signin_expired"); }
  });
  // A refused token is dropped, so that the retry the SDK makes at once asks token_url for a new one.
  onSession("disconnected", (d) => { if (d.code === 4001 && shared.config.token_url) keepToken(null); });
  // The badge: new durable events are unread; replayed ones were counted by hello already.
  for (const type of DURABLE_EVENTS) {
    onEvent(type, (_data, seq) => {
      if (seq !== undefined && seq > seenSeq) { seenSeq = seq; store.set({ unread: store.get().unread + 1 }); }
    });
  }
  onEvent("unread_count", (d) => store.set({ unread: d.unread }));
  // A replayed notification whose question or answer was taken down since (`removed`) is only counted above.
  onEvent("answer_accepted_notification", (d) => {
    if (d.removed) return;
    const u = store.get().user;
    if (u) store.set({ user: { ...u, points: d.total_points } });
    const route = store.get().route;
    const here = route.name === "q" && route.id === d.question_id;
    toast(t("accepted_toast", { points: d.points, total: d.total_points }), "good",
      here ? undefined : { label: t("alert_open"), href: href({ name: "q", id: d.question_id }) });
  });
  onEvent("answer_notification", (d) => {
    if (d.removed) return;
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
  registerWorker();
  watchGps();
  if (store.get().user?.local) shareLocation((sharing) => store.set({ sharing }));
  mountShell(root, updateDocument, signOut);
}

const root = document.getElementById("app");
if (root) void boot(root);
