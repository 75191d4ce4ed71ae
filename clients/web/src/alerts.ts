// A local's alerts: each `new_question_notification` rings (sound, vibration, a system
// notification when the page is hidden) and shows as a card the local can answer from.
import { call, errorCode, onEvent } from "./api";
import { go, store, toast, type Alert } from "./app";
import { Cleanup, h } from "./dom";
import { errorText, report } from "./errors";
import { regionName } from "./geo";
import { ago, distance, t } from "./i18n";
import { findMyAnswer, mayHaveApplied } from "./sent";
import { chime, notifySystem, vibrate } from "./signal";

/** Alerts for questions older than this only go to the inbox. */
const STALE_MS = 60 * 60 * 1000;

export function listenForAlerts(): () => void {
  return onEvent("new_question_notification", (data, seq) => {
    if (data.removed) return;  // replayed after its question was deleted or hidden: nothing to answer
    if (!store.get().user?.local) return;  // alerts go to locals; anyone else sees them in the inbox
    const { alerts } = store.get();
    if (alerts.some((a) => a.data.question_id === data.question_id)) return;
    if (Date.now() - data.question.created_at > STALE_MS) return;
    const { route } = store.get();
    const watching = route.name === "q" && route.id === data.question_id && document.visibilityState === "visible";
    if (!watching) store.set({ alerts: [...alerts, { seq, data, at: Date.now() }] });
    chime(data.sound);
    vibrate(data.vibration);
    notifySystem(t("alert_system_title"), data.question.title, data.question_id, () => go({ name: "q", id: data.question_id }));
  });
}

export function dismissAlert(questionId: string): void {
  store.set({ alerts: store.get().alerts.filter((a) => a.data.question_id !== questionId) });
}

/** Replies that say a question takes no more answers: it ended (resolved, closed, expired) or is gone. */
const ENDED = new Set(["question_closed", "not_found"]);
const OPEN: ReadonlySet<string> = new Set(["open", "answered"]);

/** An alert whose question ended: its card goes, with a word why. */
function ended(alert: Alert): void {
  if (!store.get().alerts.some((a) => a.data.question_id === alert.data.question_id)) return;
  dismissAlert(alert.data.question_id);
  toast(t("alert_question_ended", { title: alert.data.question.title }), "info");
}

/** The card for the oldest waiting alert, above every screen. */
export function mountAlertLayer(root: HTMLElement): () => void {
  const cleanup = new Cleanup();
  let shown: string | null = null;
  let more: HTMLElement | null = null;

  const render = () => {
    const { alerts } = store.get();
    const first = alerts[0];
    if (!first) {
      shown = null;
      root.replaceChildren();
      return;
    }
    if (shown === first.data.question_id) {
      if (more) more.textContent = alerts.length > 1 ? t("alert_more", { n: alerts.length - 1 }) : "";
      return;
    }
    shown = first.data.question_id;
    root.replaceChildren(card(first, alerts.length - 1));
    recheck(first);
  };

  // A card may come to the front long after its alert (behind others, or "later" on another one): its
  // question may have ended meanwhile, and the local is not in its room to hear so. Ask once.
  const recheck = (alert: Alert) => {
    call("get_question", { question_id: alert.data.question_id, limit: 1 }).then(({ question }) => {
      if (!OPEN.has(question.status)) ended(alert);
    }, (err: unknown) => { if (ENDED.has(errorCode(err))) ended(alert); else report(err); });
  };

  const card = (alert: Alert, waiting: number): HTMLElement => {
    const { data } = alert;
    const q = data.question;
    const urgent = q.urgency === "urgent";
    const id = `alert-${data.question_id}`;
    const field = h("textarea", { id: `${id}-answer`, name: "content", rows: 3, maxlength: 2000, required: true, placeholder: t("q_answer_ph") });
    const problem = h("p", { class: "form-error", role: "alert" });
    const send = h("button", { type: "submit", class: "btn btn-primary" }, t("alert_send"));
    const form = h("form", { class: "alert-form", "data-testid": "alert-form" },
      h("label", { for: field.id, class: "label" }, t("alert_answer_label")), field, problem,
      h("div", { class: "row" },
        send,
        h("button", { type: "button", class: "btn btn-ghost", onclick: () => { dismissAlert(data.question_id); go({ name: "q", id: data.question_id }); } }, t("alert_open")),
        h("button", { type: "button", class: "btn btn-ghost", onclick: () => dismissAlert(data.question_id) }, t("alert_later")),
      ),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const content = field.value.trim();
      if (!content) { field.focus(); return; }
      send.disabled = true;
      problem.textContent = "";
      const sent = () => {
        toast(t("q_answer_sent"), "good");
        dismissAlert(data.question_id);
        go({ name: "q", id: data.question_id });
      };
      const failed = (err: unknown) => {
        report(err);
        // The asker closed it, an answer was accepted, it expired or is gone: the card has nothing left to do.
        if (ENDED.has(errorCode(err))) { ended(alert); return; }
        problem.textContent = errorText(err);
        send.disabled = false;
      };
      call("create_answer", { question_id: data.question_id, content }).then(sent, (err: unknown) => {
        if (!mayHaveApplied(err)) { failed(err); return; }
        // Sent and unanswered (a drop, or a reply slower than the timeout): it may have arrived, and
        // sending it again would answer twice. Look for it first.
        problem.textContent = t("q_answer_checking");
        findMyAnswer(data.question_id, store.get().user?.user_id ?? "", content)
          .then((answer) => (answer ? sent() : failed(err)), () => failed(err));
      });
    });
    more = h("p", { class: "alert-more" }, waiting > 0 ? t("alert_more", { n: waiting }) : "");
    const where = [regionName(q.region), data.distance_m !== null ? t("alert_distance", { distance: distance(data.distance_m) }) : "", ago(q.created_at)].filter(Boolean).join(" · ");
    const section = h("section", {
      class: `alert-card${urgent ? " urgent" : ""}`, role: "alertdialog", "aria-modal": "false",
      "aria-labelledby": `${id}-title`, "aria-describedby": `${id}-meta`, "data-question-id": data.question_id,
      "data-vibration": data.vibration, tabindex: -1,
    },
      h("p", { class: "alert-kicker" }, h("span", { class: "pulse", "aria-hidden": "true" }),
        urgent ? t("alert_urgent") : data.stage === "EXTENDED" ? t("alert_expertise") : data.stage === "FINAL" ? t("alert_waiting") : t("alert_title")),
      h("h2", { id: `${id}-title`, class: "alert-title" }, q.title),
      h("p", { id: `${id}-meta`, class: "alert-meta" }, `${q.asker_nick} · ${where}`),
      q.hashtags.length ? h("p", { class: "tags" }, ...q.hashtags.map((tag) => h("span", { class: "tag" }, `#${tag}`))) : null,
      form,
      more,
    );
    // Announced by its role; focus moves to it only if the local is not in the middle of typing.
    queueMicrotask(() => {
      const active = document.activeElement;
      if (!(active instanceof HTMLInputElement || active instanceof HTMLTextAreaElement || active instanceof HTMLSelectElement)) {
        section.focus({ preventScroll: true });
      }
    });
    return section;
  };

  cleanup.add(store.subscribe((s, prev) => {
    if (s.alerts !== prev.alerts) render();
    else if (s.lang !== prev.lang) { shown = null; render(); }
  }));
  render();
  return () => cleanup.run();
}
