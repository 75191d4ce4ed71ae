// Traveller: the questions I asked (`my_questions`), newest first, with unread answers.
import { call, onEvent } from "../api";
import { go, type AppStore } from "../app";
import { Cleanup, fill, h } from "../dom";
import { errorText, report } from "../errors";
import { t, type Key } from "../i18n";
import type { Question } from "../types";
import { empty, focusHeading, heading, questionRow } from "../ui";

type Filter = "all" | "open" | "closed";

export function mount(root: HTMLElement, store: AppStore): () => void {
  const cleanup = new Cleanup();
  let filter: Filter = "all";
  let next: string | null = null;
  let items: Question[] = [];
  let generation = 0;

  const list = h("ul", { class: "q-list", id: "my-questions", "aria-labelledby": "screen-title" });
  const more = h("button", { type: "button", class: "btn btn-ghost btn-block", hidden: true }, t("more"));
  const tabs = h("div", { class: "segmented", role: "group", "aria-label": t("mine_title") });
  for (const f of ["all", "open", "closed"] as Filter[]) {
    const b = h("button", { type: "button", class: "seg", "aria-pressed": String(f === filter), "data-filter": f }, t(`mine_${f}` as Key));
    b.addEventListener("click", () => {
      filter = f;
      for (const other of tabs.children) other.setAttribute("aria-pressed", String(other === b));
      load(false);
    });
    tabs.append(b);
  }

  const render = () => {
    if (!items.length) {
      fill(list, h("li", null, empty(t("mine_empty"),
        h("button", { type: "button", class: "btn btn-primary", onclick: () => go({ name: "ask" }) }, t("mine_ask_first")))));
    } else {
      fill(list, ...items.map((q) => questionRow(q, q.unread_answers ? h("span", { class: "badge-new" }, t("mine_unread", { n: q.unread_answers })) : null)));
    }
    more.hidden = next === null;
  };

  const load = (append: boolean) => {
    const mine = ++generation;
    call("my_questions", { status: filter, limit: 20, ...(append && next ? { before: next } : {}) }).then((r) => {
      if (mine !== generation) return;
      items = append ? [...items, ...r.questions] : r.questions;
      next = r.next;
      render();
    }, (err: unknown) => { report(err); fill(list, h("li", { class: "form-error" }, errorText(err))); });
  };
  more.addEventListener("click", () => load(true));

  root.append(heading(t("mine_title")), tabs, h("section", { class: "card list-card" }, list, more));
  load(false);
  focusHeading(root);
  cleanup.add(onEvent("answer_notification", () => load(false)));
  cleanup.add(store.subscribe((s, prev) => { if (s.conn === "open" && prev.conn === "reconnecting") load(false); }));
  return () => cleanup.run();
}
