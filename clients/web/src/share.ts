// A local shares where they are while the page is open: each new position becomes an
// `update_location`, at most one per `min_update_interval_s` (the server's own rate).
import { call } from "./api";
import { shared, store, type AppState } from "./app";
import { report } from "./errors";
import { haversine } from "./geo";
import type { Loc } from "./types";

export type Sharing = NonNullable<AppState["sharing"]>;

export function shareLocation(onChange: (s: Sharing) => void): () => void {
  const interval = Math.max(0.5, shared.config.min_update_interval_s) * 1000;
  let lastSent = 0;
  let sentLoc: Loc | null = null;
  let timer: ReturnType<typeof setTimeout> | null = null;
  let stopped = false;

  const send = () => {
    timer = null;
    const { me, meAccuracy } = store.get();
    if (stopped || !me) return;
    if (sentLoc && haversine(sentLoc, me) < 10) return;
    const wait = lastSent + interval - Date.now();
    if (wait > 0) { timer = setTimeout(send, wait); return; }
    lastSent = Date.now();
    sentLoc = me;
    const data = meAccuracy !== null ? { location: me, accuracy_m: Math.min(100_000, meAccuracy) } : { location: me };
    call("update_location", data).then(
      (reply) => onChange({ live: reply.live, region: reply.region, error: null }),
      (err: unknown) => {
        sentLoc = null;
        const code = (err as { code?: string }).code;
        const retry = (err as { retryAfterMs?: number }).retryAfterMs;
        if (code === "rate_limited") { timer = setTimeout(send, retry ?? interval); return; }
        report(err);
        onChange({ live: false, region: null, error: code ?? "connection_lost" });
      },
    );
  };

  const off = store.subscribe((s, prev) => {
    if (s.me !== prev.me && timer === null) send();
    // After a reconnect the SDK re-sends the last position itself; a position that failed is tried again.
    if (s.conn === "open" && prev.conn !== "open" && sentLoc === null && timer === null) send();
  });
  send();
  return () => { stopped = true; off(); if (timer) clearTimeout(timer); };
}
