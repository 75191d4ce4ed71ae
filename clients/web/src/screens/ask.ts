// Traveller: where am I, how many locals are near, and the question form.
import { call, RequestError } from "../api";
import { go, shared, type AppStore } from "../app";
import { Cleanup, h } from "../dom";
import { errorText, report } from "../errors";
import { chooseOnMap, regionAt } from "../geo";
import { t } from "../i18n";
import { mountMap } from "../map";
import { mayHaveApplied, sameText } from "../sent";
import { focusHeading, heading, placePanel } from "../ui";
import type { Loc } from "../types";

export { sameText };

/** "#food, 맛집  Beach" -> ["food", "맛집", "beach"]: as the server normalises them (NFC, '#' dropped, lower case,
 * repeats once). All of them: more than MAX_TAGS are refused, not cut (the user meant each). */
export function parseTags(text: string): string[] {
  const tags = text.normalize("NFC").split(/[\s,，]+/).map((s) => s.replace(/^#+/, "").trim().toLowerCase()).filter(Boolean);
  return [...new Set(tags)];
}

/** The server's limit on a question's hashtags (PROTOCOL.md, create_question). */
export const MAX_TAGS = 5;

/** The server's rule for a hashtag (dongne/core/protocol.py, HASHTAG): 1-30 of a-z, 0-9, '_' or Hangul. */
const HASHTAG = /^[0-9a-z_\u3131-\u318e\uac00-\ud7a3]{1,30}$/;

/** The first of `tags` (from parseTags) the server would refuse, or null if it takes them all. */
export function invalidTag(tags: string[]): string | null {
  return tags.find((tag) => !HASHTAG.test(tag)) ?? null;
}

export function mount(root: HTMLElement, store: AppStore): () => void {
  const cleanup = new Cleanup();

  const mapBox = h("div", { class: "map-box" });
  const n2 = h("strong", { class: "stat-value", id: "locals-2km" }, "–");
  const n5 = h("strong", { class: "stat-value", id: "locals-5km" }, "–");
  const localsNote = h("p", { class: "hint" });
  const locals = h("section", { class: "locals-inline", "aria-labelledby": "locals-title", "aria-live": "polite" },
    h("h2", { id: "locals-title", class: "card-title" }, t("locals_near")),
    h("div", { class: "stats" },
      h("p", { class: "stat" }, n2, h("span", { class: "stat-label" }, t("locals_2km"))),
      h("p", { class: "stat" }, n5, h("span", { class: "stat-label" }, t("locals_5km")))),
    localsNote);

  const title = h("input", { id: "ask-title", name: "title", type: "text", required: true, maxlength: 200, autocomplete: "off", placeholder: t("ask_field_title_ph") });
  const body = h("textarea", { id: "ask-body", name: "body", rows: 3, maxlength: 1000, placeholder: t("ask_field_body_ph") });
  const tags = h("input", { id: "ask-tags", name: "hashtags", type: "text", maxlength: 200, autocomplete: "off", placeholder: t("ask_field_tags_ph") });
  const urgent = h("input", { id: "ask-urgent", name: "urgent", type: "checkbox", class: "switch" });
  const tagsError = h("p", { class: "form-error field-error", id: "ask-tags-error" });
  const problem = h("p", { class: "form-error", role: "alert" });
  const submit = h("button", { type: "submit", class: "btn btn-primary btn-block", id: "ask-submit" }, t("ask_submit"));
  const form = h("form", { class: "card ask-form", id: "ask-form", "aria-labelledby": "ask-form-title", novalidate: true },
    h("h2", { id: "ask-form-title", class: "card-title" }, t("ask_field_title")),
    h("label", { for: "ask-title", class: "visually-hidden" }, t("ask_field_title")), title,
    h("label", { for: "ask-body", class: "label" }, t("ask_field_body")), body,
    h("label", { for: "ask-tags", class: "label" }, t("ask_field_tags")), tags, tagsError,
    h("div", { class: "toggle-row" },
      urgent,
      h("label", { for: "ask-urgent", class: "toggle-label" }, h("strong", null, t("ask_field_urgent")), h("span", { class: "hint" }, t("ask_field_urgent_hint")))),
    problem, submit);

  // A hashtag the server would refuse is named under the field (the whole question is refused for it).
  const tagsWrong = (text: string) => {
    tagsError.textContent = text;
    tags.setAttribute("aria-invalid", "true");
    tags.setAttribute("aria-describedby", tagsError.id);
    tags.focus();
  };
  tags.addEventListener("input", () => {
    if (!tags.hasAttribute("aria-invalid")) return;
    tagsError.textContent = "";
    tags.removeAttribute("aria-invalid");
    tags.removeAttribute("aria-describedby");
  });

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const me = store.get().me;
    problem.textContent = "";
    if (!title.value.trim()) { title.focus(); problem.textContent = t("err_invalid_field"); return; }
    const hashtags = parseTags(tags.value);
    const bad = invalidTag(hashtags);
    if (bad !== null) { tagsWrong(t("ask_tag_invalid", { tag: bad })); return; }
    if (hashtags.length > MAX_TAGS) { tagsWrong(t("ask_tags_too_many", { max: MAX_TAGS, count: hashtags.length })); return; }
    if (!me || !regionAt(me)) { problem.textContent = t("ask_need_location"); return; }
    submit.disabled = true;
    submit.textContent = t("ask_sending");
    const asked = { title: title.value.trim(), body: body.value.trim() };
    const failed = (err: unknown) => {
      report(err);
      // The server's rule may be stricter than ours: its own words name the hashtag it refused.
      if (err instanceof RequestError && err.code === "invalid_field" && /hashtag/i.test(err.error.message)) tagsWrong(err.error.message);
      else problem.textContent = errorText(err);
      submit.disabled = false;
      submit.textContent = t("ask_submit");
    };
    call("create_question", {
      ...asked, location: me,
      ...(hashtags.length ? { hashtags } : {}), urgency: urgent.checked ? "urgent" : "normal",
    }).then(({ question }) => {
      go({ name: "q", id: question.question_id });
    }, (err: unknown) => {
      if (!mayHaveApplied(err)) { failed(err); return; }
      // Sent, and no reply came (the connection dropped, or the reply is slower than the timeout): it may
      // have been posted, and asking again would alert the locals twice. Look among my newest open questions.
      problem.textContent = t("ask_checking");
      call("my_questions", { status: "open", limit: 5 }).then(({ questions }) => {
        const posted = questions.find((q) => sameText(q.title, asked.title) && sameText(q.body ?? "", asked.body));
        if (posted) go({ name: "q", id: posted.question_id });
        else failed(err);
      }, () => failed(err));
    });
  });

  root.append(
    heading(t("ask_title"), t("ask_lead")),
    h("div", { class: "layout-two" },
      h("div", { class: "col" }, h("section", { class: "card map-card", "aria-label": t("map_label") }, mapBox, placePanel(cleanup), locals)),
      h("div", { class: "col" }, form)),
  );

  // A street map is worth seeing around me; the regions map shows the whole island.
  const street = !!shared.config.tile_url;
  const map = mountMap(mapBox, { onTap: chooseOnMap, rings: true, focus: street ? store.get().me : null, spanKm: 6 });
  cleanup.add(() => map.destroy());

  // How many locals are near: on each new position, every 15 s, and after a reconnect.
  let asked: Loc | null = null;
  let pending: ReturnType<typeof setTimeout> | null = null;
  const countLocals = () => {
    pending = null;
    const me = store.get().me;
    if (!me || !regionAt(me)) {
      n2.textContent = n5.textContent = "–";
      localsNote.textContent = me ? t("geo_outside") : t("locals_unknown");
      return;
    }
    asked = me;
    call("nearby_locals", { location: me }).then((r) => {
      if (asked !== me) return;
      n2.textContent = t("locals_count", { n: r.within_2km });
      n5.textContent = t("locals_count", { n: r.within_5km });
      localsNote.textContent = "";
    }, report);
  };
  const soon = () => { if (pending === null) pending = setTimeout(countLocals, 300); };
  cleanup.add(() => { if (pending) clearTimeout(pending); });
  cleanup.add(store.subscribe((s, prev) => {
    if (s.me !== prev.me) {
      map.setMe(s.me);
      if (street && s.me && (!prev.me || s.meSource !== prev.meSource)) map.setFocus(s.me);
      soon();
    }
    if (s.conn === "open" && prev.conn !== "open") soon();
  }));
  cleanup.timer(() => { if (store.get().conn === "open") countLocals(); }, 15_000);
  map.setMe(store.get().me);
  countLocals();
  focusHeading(root);
  return () => cleanup.run();
}
