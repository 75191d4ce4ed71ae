// The app's state (one store) and the read-only things every screen shares.
import type { ConnState } from "./api";
import { createStore, type Store } from "./store";
import type { Loc, NewQuestionAlert, Regions, User, WebConfig } from "./types";

export type Lang = "ko" | "en";

export type RouteName = "ask" | "mine" | "inbox" | "q" | "nearby" | "profile" | "settings";
export interface Route { name: RouteName; id?: string }

export interface Alert { seq: number | undefined; data: NewQuestionAlert; at: number }

export interface Toast { id: number; text: string; kind: "info" | "good" | "error"; action?: { label: string; href: string } }

export interface AppState {
  lang: Lang;
  conn: ConnState;
  /** Why the session ended for good (a close code, or "signin" when the token was refused). */
  ended: string | null;
  user: User | null;
  unread: number;
  /** Where I am: from the Geolocation API, or a place tapped on the map. */
  me: Loc | null;
  meSource: "gps" | "map" | null;
  meAccuracy: number | null;
  geo: "idle" | "watching" | "denied" | "unavailable";
  route: Route;
  /** Durable events were lost between two connections (hello's `resumed: false`). */
  missed: boolean;
  alerts: Alert[];
  toasts: Toast[];
  /** A local's position sharing: whether the server put them in the live index. */
  sharing: { live: boolean; region: string | null; error: string | null } | null;
}

export type AppStore = Store<AppState>;

const LANG_KEY = "dongne.lang";

export function savedLang(): Lang {
  try {
    return localStorage.getItem(LANG_KEY) === "en" ? "en" : "ko";
  } catch {
    return "ko";
  }
}

export function saveLang(lang: Lang): void {
  try { localStorage.setItem(LANG_KEY, lang); } catch { /* private mode: the choice lasts this page */ }
}

export const store: AppStore = createStore<AppState>({
  lang: savedLang(), conn: "connecting", ended: null, user: null, unread: 0,
  me: null, meSource: null, meAccuracy: null, geo: "idle",
  route: { name: "ask" }, missed: false, alerts: [], toasts: [], sharing: null,
});

/** Loaded once at start-up, before any screen mounts. */
export const shared: { config: WebConfig; regions: Regions } = {
  config: { ws_path: "/ws", tile_url: "", tile_attribution: "", token_url: "", min_update_interval_s: 2, protocol: 1 },
  regions: { type: "FeatureCollection", features: [] },
};

// ---- routes: #/ask, #/q/<id>, ... (the fragment's token is taken away before routing starts)

export function parseRoute(hash: string, local: boolean): Route {
  const [name, id] = hash.replace(/^#\/?/, "").split("/");
  const names: RouteName[] = ["ask", "mine", "inbox", "q", "nearby", "profile", "settings"];
  if (name === "q" && id) return { name: "q", id: decodeURIComponent(id) };
  if (name && name !== "q" && (names as string[]).includes(name)) return { name: name as RouteName };
  return { name: local ? "nearby" : "ask" };
}

export function href(route: Route): string {
  return route.id ? `#/${route.name}/${encodeURIComponent(route.id)}` : `#/${route.name}`;
}

export function go(route: Route): void {
  const target = href(route);
  if (location.hash === target) store.set({ route });
  else location.hash = target;
}

// ---- toasts

let toastId = 0;
export function toast(text: string, kind: Toast["kind"] = "info", action?: Toast["action"]): void {
  const id = ++toastId;
  store.set({ toasts: [...store.get().toasts.slice(-2), { id, text, kind, action }] });
  setTimeout(() => store.set({ toasts: store.get().toasts.filter((t) => t.id !== id) }), kind === "error" ? 7000 : 5000);
}
