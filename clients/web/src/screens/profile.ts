// Local: points, answers given and accepted (`get_profile`, `get_user`), and my answers (`my_answers`).
import { call, onEvent } from "../api";
import type { AppStore } from "../app";
import { Cleanup, fill, h } from "../dom";
import { errorText, report } from "../errors";
import { ago, t } from "../i18n";
import type { Answer } from "../types";
import { empty, focusHeading, heading, link, statusChip } from "../ui";

export function mount(root: HTMLElement, store: AppStore): () => void {
  const cleanup = new Cleanup();
  const user = store.get().user;
  const points = h("strong", { class: "stat-value", id: "profile-points" }, String(user?.points ?? 0));
  const given = h("strong", { class: "stat-value", id: "profile-given" }, "–");
  const accepted = h("strong", { class: "stat-value", id: "profile-accepted" }, "–");
  const list = h("ul", { class: "a-list", id: "my-answers", "aria-labelledby": "my-answers-title" });
  const more = h("button", { type: "button", class: "btn btn-ghost btn-block", hidden: true }, t("more"));
  let answers: Answer[] = [];
  let next: string | null = null;

  const who = h("section", { class: "card profile-card" },
    h("div", { class: "profile-id" },
      h("span", { class: "avatar avatar-large", "aria-hidden": "true" }, (user?.nick.trim()[0] ?? "?").toUpperCase()),
      h("div", null, h("p", { class: "profile-nick" }, user?.nick ?? ""),
        h("p", { class: "hint" }, `${user?.local ? t("role_local") : t("role_traveller")} · ${user?.user_id ?? ""}`),
        user?.tags.length ? h("p", { class: "tags" }, ...user.tags.map((tag) => h("span", { class: "tag" }, `#${tag}`))) : "")),
    h("div", { class: "stats stats-3" },
      h("p", { class: "stat" }, points, h("span", { class: "stat-label" }, t("profile_points"))),
      h("p", { class: "stat" }, given, h("span", { class: "stat-label" }, t("profile_given"))),
      h("p", { class: "stat" }, accepted, h("span", { class: "stat-label" }, t("profile_accepted")))));

  const render = () => {
    if (!answers.length) fill(list, h("li", null, empty(t("profile_no_answers"))));
    else fill(list, ...answers.map((a) => h("li", { class: `a-row${a.accepted ? " accepted" : ""}`, "data-answer-id": a.answer_id },
      link({ name: "q", id: a.question_id }, { class: "q-link" },
        h("span", { class: "q-row-top" }, a.question_status ? statusChip(a.question_status) : "",
          a.accepted ? h("span", { class: "chip chip-accepted" }, `✓ ${t("profile_accepted_badge")}`) : ""),
        h("span", { class: "q-title" }, a.question_title ?? ""),
        h("span", { class: "a-text" }, a.content),
        h("span", { class: "q-meta" }, ago(a.created_at))))));
    more.hidden = next === null;
  };

  const load = (append: boolean) => {
    call("get_profile", {}).then((r) => { store.set({ user: r.user }); points.textContent = String(r.user.points); }, report);
    if (user) call("get_user", { user_id: user.user_id }).then((r) => {
      given.textContent = String(r.user.answers_given);
      accepted.textContent = String(r.user.answers_accepted);
    }, report);
    call("my_answers", { limit: 20, ...(append && next ? { before: next } : {}) }).then((r) => {
      answers = append ? [...answers, ...r.answers] : r.answers;
      next = r.next;
      render();
    }, (err: unknown) => { report(err); fill(list, h("li", { class: "form-error" }, errorText(err))); });
  };
  more.addEventListener("click", () => load(true));

  root.append(heading(t("profile_title")), h("div", { class: "layout-two" },
    h("div", { class: "col" }, who),
    h("div", { class: "col" }, h("section", { class: "card list-card" },
      h("h2", { id: "my-answers-title", class: "card-title" }, t("profile_my_answers")), list, more))));
  load(false);
  focusHeading(root);
  cleanup.add(onEvent("answer_accepted_notification", () => load(false)));
  return () => cleanup.run();
}
