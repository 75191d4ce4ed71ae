// Everyone: the notification inbox (`list_notifications`); opening it marks all read.
import { call, DURABLE_EVENTS, onEvent } from "../api";
import type { AppStore } from "../app";
import { Cleanup, fill, h } from "../dom";
import { errorText, report } from "../errors";
import { ago, t } from "../i18n";
import { icon, type IconName } from "../icons";
import type { Notification_ } from "../types";
import { empty, focusHeading, heading } from "../ui";

function describe(n: Notification_): { text: string; detail?: string; questionId: string | null; icon: IconName } {
  const d = n.data as Record<string, unknown>;
  const qid = typeof d.question_id === "string" ? d.question_id : null;
  // Its question or answer was deleted or hidden since: ids only, nothing of what it said.
  if (d.removed === true) return { text: t("n_removed"), questionId: null, icon: "warn" };
  const question = (d.question ?? {}) as { title?: string };
  const answer = (d.answer ?? {}) as { author_nick?: string; content?: string };
  switch (n.type) {
    case "answer_notification":
      return { text: t("n_answer", { nick: answer.author_nick ?? "", title: String(d.question_title ?? "") }), detail: answer.content, questionId: qid, icon: "chat" };
    case "answer_accepted_notification":
      return { text: t("n_accepted", { points: Number(d.points ?? 0), title: String(d.question_title ?? "") }), questionId: qid, icon: "star" };
    case "new_question_notification":
      return { text: t("n_question", { title: question.title ?? "" }), questionId: qid, icon: "pin" };
    case "slow_response_alert":
      return { text: t("n_slow", { title: question.title ?? "" }), questionId: qid, icon: "clock" };
    default:
      return { text: t("n_hidden", { reason: String(d.reason ?? "") }), questionId: null, icon: "warn" };
  }
}

export function mount(root: HTMLElement, store: AppStore): () => void {
  const cleanup = new Cleanup();
  let items: Notification_[] = [];
  let next: number | null = null;
  const list = h("ul", { class: "n-list", id: "notifications", "aria-labelledby": "screen-title" });
  const more = h("button", { type: "button", class: "btn btn-ghost btn-block", hidden: true }, t("more"));
  const status = h("p", { class: "hint", role: "status" });

  const render = () => {
    if (!items.length) fill(list, h("li", null, empty(t("inbox_empty"))));
    else fill(list, ...items.map((n) => {
      const { text, detail, questionId, icon: glyph } = describe(n);
      const body = [
        h("span", { class: `n-icon n-${n.type}`, "aria-hidden": "true" }, icon(glyph)),
        h("span", { class: "n-text" }, !n.read ? h("span", { class: "visually-hidden" }, `${t("inbox_new")}: `) : "", text,
          detail ? h("span", { class: "n-detail" }, detail) : "",
          h("time", { class: "when", datetime: new Date(n.created_at).toISOString() }, ago(n.created_at))),
      ];
      return h("li", { class: `n-item${n.read ? "" : " unread"}`, "data-seq": n.seq, "data-type": n.type },
        questionId ? h("a", { class: "n-link", href: `#/q/${encodeURIComponent(questionId)}` }, ...body) : h("div", { class: "n-link" }, ...body));
    }));
    more.hidden = next === null;
  };

  const markAll = () => {
    const top = items.reduce((m, n) => Math.max(m, n.seq), 0);
    if (!top || store.get().unread === 0) return;
    call("mark_notifications_read", { up_to_seq: top }).then((r) => {
      store.set({ unread: r.unread });
      status.textContent = r.unread === 0 ? t("inbox_all_read") : "";
    }, report);
  };

  const load = (append: boolean) => {
    call("list_notifications", { limit: 30, ...(append && next !== null ? { before_seq: next } : {}) }).then((r) => {
      items = append ? [...items, ...r.notifications] : r.notifications;
      next = r.next_before_seq;
      store.set({ unread: r.unread });
      render();
      if (!append) markAll();
    }, (err: unknown) => { report(err); fill(list, h("li", { class: "form-error" }, errorText(err))); });
  };
  more.addEventListener("click", () => load(true));

  const markButton = h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: markAll, hidden: store.get().unread === 0 }, t("inbox_mark_read"));
  cleanup.add(store.subscribe((s) => { markButton.hidden = s.unread === 0; }));
  root.append(heading(t("inbox_title")), h("div", { class: "toolbar" }, status, markButton), h("section", { class: "card list-card" }, list, more));
  load(false);
  focusHeading(root);
  let refresh: ReturnType<typeof setTimeout> | null = null;
  const soon = () => { if (!refresh) refresh = setTimeout(() => { refresh = null; load(false); }, 400); };
  for (const type of DURABLE_EVENTS) {
    cleanup.add(onEvent(type, soon));
  }
  cleanup.add(() => { if (refresh) clearTimeout(refresh); });
  cleanup.add(store.subscribe((s, prev) => { if (s.conn === "open" && prev.conn === "reconnecting") soon(); }));
  return () => cleanup.run();
}
