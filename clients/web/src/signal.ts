// How an alert reaches a local: a chime (Web Audio), a vibration pattern, a system notification.

let audio: AudioContext | null = null;

const readyListeners = new Set<() => void>();

/** Whether alerts can sound and vibrate now (the page has had its first tap). */
export function soundReady(): boolean {
  return audio !== null && audio.state === "running";
}

export function onSoundReady(fn: () => void): () => void {
  readyListeners.add(fn);
  return () => { readyListeners.delete(fn); };
}

/** Browsers let a page make sound only after a tap: the first one creates the audio context. */
export function unlockSound(): void {
  try {
    if (!audio) {
      audio = new AudioContext();
      audio.addEventListener("statechange", () => { if (soundReady()) for (const fn of [...readyListeners]) fn(); });
    }
    if (audio.state === "suspended") void audio.resume();
    if (soundReady()) for (const fn of [...readyListeners]) fn();
  } catch { /* no Web Audio: alerts stay silent */ }
}

export function armSound(): () => void {
  const unlock = () => unlockSound();
  const opts = { capture: true, passive: true } as const;
  document.addEventListener("pointerdown", unlock, opts);
  document.addEventListener("keydown", unlock, opts);
  return () => {
    document.removeEventListener("pointerdown", unlock, opts);
    document.removeEventListener("keydown", unlock, opts);
  };
}

/** Two rising notes; three, louder and higher, for `urgent`. */
export function chime(sound: "urgent" | "normal"): void {
  if (!audio || audio.state !== "running") return;
  const urgent = sound === "urgent";
  const notes = urgent ? [880, 1175, 1568] : [660, 880];
  const peak = urgent ? 0.5 : 0.18;
  const start = audio.currentTime + 0.02;
  notes.forEach((freq, i) => {
    const osc = audio!.createOscillator();
    const gain = audio!.createGain();
    const at = start + i * 0.16;
    osc.type = urgent ? "square" : "sine";
    osc.frequency.value = freq;
    gain.gain.setValueAtTime(0.0001, at);
    gain.gain.exponentialRampToValueAtTime(peak, at + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, at + 0.15);
    osc.connect(gain).connect(audio!.destination);
    osc.start(at);
    osc.stop(at + 0.16);
  });
}

/** The patterns the server's `vibration` names (ms on, off, on…). */
export const VIBRATION: Record<"strong" | "light", number[]> = {
  strong: [400, 150, 400, 150, 600],
  light: [150],
};

export function vibrate(kind: "strong" | "light"): void {
  if (typeof navigator.vibrate !== "function") return;
  // Without a tap first, Chrome refuses (and logs) the call; the page cannot vibrate then anyway.
  const activation = (navigator as Navigator & { userActivation?: { hasBeenActive: boolean } }).userActivation;
  if (activation && !activation.hasBeenActive) return;
  navigator.vibrate(VIBRATION[kind] ?? VIBRATION.light);
}

export function systemNotificationsState(): "on" | "off" | "denied" | "unsupported" {
  if (!("Notification" in window)) return "unsupported";
  return Notification.permission === "granted" ? "on" : Notification.permission === "denied" ? "denied" : "off";
}

// ---- system notifications

const clickHandlers = new Map<string, () => void>();
let worker: Promise<ServiceWorkerRegistration | null> | null = null;

/**
 * Register the service worker (`sw.js`, same origin: the CSP's script-src 'self' covers it as
 * worker-src). Android Chrome shows notifications only through it; elsewhere it is unused.
 */
export function registerWorker(): void {
  const container = navigator.serviceWorker;
  if (worker || !container || !window.isSecureContext) return;
  worker = container.register("sw.js").catch(() => null);
  container.addEventListener("message", (event: MessageEvent<{ type?: string; tag?: string }>) => {
    if (event.data?.type !== "notificationclick" || typeof event.data.tag !== "string") return;
    const onClick = clickHandlers.get(event.data.tag);
    clickHandlers.delete(event.data.tag);
    window.focus();
    onClick?.();
  });
}

/** The worker's registration once it is active, or null (none, not yet, failed). */
async function activeWorker(): Promise<ServiceWorkerRegistration | null> {
  const registration = worker ? await worker : null;
  return registration?.active ? registration : null;
}

/**
 * A system notification, only while the page is hidden and the user allowed them: through the
 * service worker where there is one (the only way on Android Chrome), else `new Notification`.
 */
export function notifySystem(title: string, body: string, tag: string, onClick: () => void): void {
  if (document.visibilityState !== "hidden" || systemNotificationsState() !== "on") return;
  const options: NotificationOptions = { body, tag, icon: "icon.svg", lang: document.documentElement.lang };
  void (async () => {
    const registration = await activeWorker();
    if (registration) {
      try {
        clickHandlers.set(tag, onClick);
        await registration.showNotification(title, options);
        return;
      } catch {
        clickHandlers.delete(tag); // e.g. the permission was withdrawn meanwhile: try the page's own
      }
    }
    try {
      const n = new Notification(title, options);
      n.onclick = () => { window.focus(); onClick(); n.close(); };
    } catch { /* no way to notify here: the in-page alert is there anyway */ }
  })();
}
