// A question's room: the question, answers arriving live, who is here and who is typing;
// the asker accepts one, everyone else may answer.
import { call, errorCode, onEvent, onSession } from "../api";
import { toast, type AppStore } from "../app";
import { Cleanup, fill, h } from "../dom";
import { errorText, report } from "../errors";
import { regionName } from "../geo";
import { ago, t, type Key } from "../i18n";
import { mountMap, type MapView } from "../map";
import { dismissAlert } from "../alerts";
import { findMyAnswer, mayHaveApplied } from "../sent";
import type { Answer, Person, Question } from "../types";
import { focusHeading, goHome, statusChip, urgentChip } from "../ui";

const TYPING_EVERY_MS = 2000;

export function mount(root: HTMLElement, store: AppStore): () => void {
  const cleanup = new Cleanup();
  const id = store.get().route.id ?? "";
  const me = store.get().user?.user_id ?? "";
  dismissAlert(id);

  let question: Question | null = null;
  let answers: Answer[] = [];
  let online: Person[] = [];
  let onlineCount = 0;
  const typing = new Map<string, string>();
  let gone = false;
  let map: MapView | null = null;

  const back = h("button", { type: "button", class: "btn btn-ghost btn-small back", onclick: () => (history.length > 1 ? history.back() : goHome()) }, `← ${t("q_back")}`);
  // One heading for the screen's life: replaced, it would take the focus (and its announcement) with it.
  const title = h("h1", { id: "screen-title", tabindex: -1 }, t("q_loading"));
  const chips = h("div", { class: "chips" });
  const body = h("p", { class: "q-body" });
  const tags = h("p", { class: "tags" });
  const meta = h("p", { class: "q-meta" });
  const head = h("div", { class: "q-head" }, chips, title, body, tags, meta);
  const mapBox = h("div", { class: "map-box map-small" });
  const presence = h("p", { class: "presence", id: "presence" });
  const typingLine = h("p", { class: "typing", id: "typing", "aria-live": "polite" });
  const list = h("ol", { class: "answers", id: "answers", "aria-labelledby": "answers-title" });
  const answersTitle = h("h2", { id: "answers-title", class: "card-title" });
  const composer = h("div", { class: "composer-box" });
  const controls = h("div", { class: "q-controls" });
  const notice = h("p", { class: "notice", role: "status" });

  root.append(back, h("article", { class: "q-room", "aria-labelledby": "screen-title" },
    h("section", { class: "card q-card" }, head, mapBox),
    h("section", { class: "card" },
      h("div", { class: "answers-head" }, answersTitle, presence),
      list, typingLine, notice, composer, controls)));
  focusHeading(root);

  const isAsker = () => question?.asker_id === me;
  const isOpen = () => question !== null && (question.status === "open" || question.status === "answered");

  const renderHead = () => {
    if (!question) return;
    const q = question;
    fill(chips, statusChip(q.status), q.urgency === "urgent" ? urgentChip() : "",
      h("span", { class: "chip chip-region" }, regionName(q.region)),
      isAsker() ? h("span", { class: "chip chip-mine" }, t("q_is_yours")) : "");
    title.textContent = q.title;
    body.textContent = q.body;
    fill(tags, ...q.hashtags.map((tag) => h("span", { class: "tag" }, `#${tag}`)));
    meta.textContent = t("q_asked_by", { nick: q.asker_nick, time: ago(q.created_at) });
    if (!map) {
      map = mountMap(mapBox, { focus: q.location, spanKm: 5 });
      cleanup.add(() => map?.destroy());
    }
    map.setPins([{ id: q.question_id, loc: q.location, kind: q.urgency === "urgent" ? "urgent" : isOpen() ? "question" : "done", label: q.title }]);
  };

  // An accept or close refused: said; after a conflict (another server changed the question first:
  // accepted, closed or expired it) the question is read again rather than the request retried.
  const refused = (err: unknown): void => {
    report(err);
    toast(errorText(err), "error");
    if (errorCode(err) === "conflict") join();
  };

  const answerItem = (a: Answer): HTMLElement => {
    const accepted = a.accepted || question?.accepted_answer_id === a.answer_id;
    const foot = h("div", { class: "answer-foot" });
    if (accepted) foot.append(h("span", { class: "chip chip-accepted" }, `✓ ${t("q_accepted")}`));
    if (a.author_id === me) foot.append(h("span", { class: "receipt", "data-state": a.state }, t(`q_state_${a.state}` as Key)));
    if (isAsker() && isOpen() && !question?.accepted_answer_id) {
      const accept = h("button", { type: "button", class: "btn btn-small btn-accept", "data-accept": a.answer_id }, t("q_accept"));
      accept.addEventListener("click", () => {
        accept.disabled = true;
        call("accept_answer", { question_id: id, answer_id: a.answer_id }).then((r) => {
          question = r.question;
          upsert(r.answer);
          toast(t("q_accept_done"), "good");
          render();
        }, (err: unknown) => { accept.disabled = false; refused(err); });
      });
      foot.append(accept);
    }
    return h("li", { class: `answer${accepted ? " accepted" : ""}${a.author_id === me ? " mine" : ""}`, "data-answer-id": a.answer_id },
      h("div", { class: "answer-head" },
        h("span", { class: "avatar", "aria-hidden": "true" }, (a.author_nick.trim()[0] ?? "?").toUpperCase()),
        h("span", { class: "author" }, a.author_nick),
        a.author_local ? h("span", { class: "chip chip-local" }, t("q_local_badge")) : "",
        h("span", { class: "points" }, t("q_points", { n: a.author_points })),
        h("time", { class: "when", datetime: new Date(a.created_at).toISOString() }, ago(a.created_at))),
      h("p", { class: "answer-text" }, a.content),
      foot);
  };

  const renderAnswers = () => {
    answersTitle.textContent = t("q_answers", { n: answers.length });
    if (!answers.length) fill(list, h("li", { class: "empty-line" }, t("q_no_answers")));
    else fill(list, ...answers.map(answerItem));
  };

  const renderPresence = () => {
    const names = online.filter((p) => p.user_id !== me).map((p) => p.nick);
    presence.textContent = onlineCount > 0 ? `${t("q_online", { n: onlineCount })}${names.length ? ` · ${names.slice(0, 3).join(", ")}` : ""}` : "";
    const who = [...typing.entries()].filter(([uid]) => uid !== me).map(([, nick]) => nick);
    typingLine.textContent = who.length === 1 ? t("q_typing_one", { nick: who[0] ?? "" }) : who.length > 1 ? t("q_typing_many", { n: who.length }) : "";
  };

  let composerMode = "";
  const renderComposer = () => {
    const mode = !question ? "none" : !isOpen() ? "closed" : isAsker() ? "asker" : "answerer";
    if (mode === composerMode) return;  // keeps a half-written answer while the room changes
    composerMode = mode;
    composer.replaceChildren();
    controls.replaceChildren();
    notice.textContent = mode === "closed" ? t("q_closed_notice") : "";
    if (mode === "none" || mode === "closed") return;
    if (isAsker()) {
      const close = h("button", { type: "button", class: "btn btn-ghost btn-small" }, t("q_close"));
      close.addEventListener("click", () => {
        if (!confirm(t("q_close_confirm"))) return;
        call("close_question", { question_id: id }).then((r) => { question = r.question; render(); }, refused);
      });
      controls.append(close);
      return;
    }
    composer.append(answerForm());
  };

  let typingSince = 0;
  const stopTyping = () => {
    if (!typingSince) return;
    typingSince = 0;
    call("typing_stop", { question_id: id }).catch(() => undefined);
  };
  cleanup.add(stopTyping);

  const answerForm = (): HTMLElement => {
    const field = h("textarea", { id: "answer-content", name: "content", rows: 3, maxlength: 2000, required: true, placeholder: t("q_answer_ph") });
    const problem = h("p", { class: "form-error", role: "alert" });
    const send = h("button", { type: "submit", class: "btn btn-primary", id: "answer-submit" }, t("q_answer_submit"));
    const form = h("form", { class: "composer", id: "answer-form" },
      h("label", { for: "answer-content", class: "label" }, t("q_your_answer")), field, problem, h("div", { class: "row" }, send));
    field.addEventListener("input", () => {
      if (!field.value.trim()) { stopTyping(); return; }
      if (Date.now() - typingSince < TYPING_EVERY_MS) return;
      typingSince = Date.now();
      call("typing_start", { question_id: id }).catch(() => { typingSince = 0; });
    });
    field.addEventListener("blur", stopTyping);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const content = field.value.trim();
      if (!content) { field.focus(); return; }
      send.disabled = true;
      problem.textContent = "";
      typingSince = 0;  // an answer ends typing on the server
      const sent = (answer: Answer) => {
        field.value = "";
        send.disabled = false;
        problem.textContent = "";
        upsert(answer);
        renderAnswers();
        toast(t("q_answer_sent"), "good");
      };
      const failed = (err: unknown) => { report(err); problem.textContent = errorText(err); send.disabled = false; };
      call("create_answer", { question_id: id, content }).then(({ answer }) => sent(answer), (err: unknown) => {
        if (!mayHaveApplied(err)) { failed(err); return; }
        // Sent and unanswered (a drop, or a reply slower than the timeout): it may have arrived, and
        // sending it again would answer twice. Look for it first.
        problem.textContent = t("q_answer_checking");
        findMyAnswer(id, me, content).then((answer) => (answer ? sent(answer) : failed(err)), () => failed(err));
      });
    });
    return form;
  };

  const render = () => { renderHead(); renderAnswers(); renderPresence(); renderComposer(); };

  const upsert = (a: Answer) => {
    const i = answers.findIndex((x) => x.answer_id === a.answer_id);
    if (i >= 0) answers[i] = { ...answers[i], ...a };
    else answers = [...answers, a].sort((x, y) => x.created_at - y.created_at);
  };

  // The asker reads answers by seeing them: receipts go back to their authors.
  const markRead = () => {
    if (!isAsker() || document.visibilityState !== "visible") return;
    const unread = answers.filter((a) => a.state !== "read" && a.author_id !== me).map((a) => a.answer_id);
    if (!unread.length) return;
    for (const a of answers) if (unread.includes(a.answer_id)) a.state = "read";
    call("mark_read", { question_id: id, answer_ids: unread }).catch(report);
  };

  type Joined = Awaited<ReturnType<typeof call<"join_question">>>;
  const show = (r: Joined) => {
    if (gone) return;
    question = r.question;
    answers = r.answers;
    online = r.online;
    onlineCount = r.online_count;
    typing.clear();
    for (const p of r.typing) typing.set(p.user_id, p.nick);
    render();
    markRead();
  };
  const join = () => {
    call("join_question", { question_id: id }).then(show, (err: unknown) => {
      report(err);
      if (gone) return;
      title.textContent = (err as { code?: string }).code === "not_found" ? t("q_deleted") : errorText(err);
    });
  };
  join();
  cleanup.add(() => {
    gone = true;
    // Sent even while reconnecting (the SDK sends it once open), or the room would be re-joined.
    call("leave_question", { question_id: id }).catch(() => undefined);
  });

  const mine = <T extends { question_id: string }>(fn: (d: T) => void) => (d: T) => { if (d.question_id === id && !gone) fn(d); };
  const arrived = (a: Answer) => {
    const known = answers.some((x) => x.answer_id === a.answer_id);
    upsert(a);
    typing.delete(a.author_id);
    if (question && !known) question = { ...question, answer_count: question.answer_count + 1, status: question.status === "open" ? "answered" : question.status };
    render();
    markRead();
  };
  cleanup.add(onEvent("new_answer", mine((d) => arrived(d.answer))));
  cleanup.add(onEvent("answer_notification", mine((d) => { if (!d.removed) arrived(d.answer); })));
  cleanup.add(onEvent("answer_accepted", mine((d) => {
    answers = answers.map((a) => (a.answer_id === d.answer_id ? { ...a, accepted: true, author_points: a.author_points + d.points } : a));
    if (question) question = { ...question, accepted_answer_id: d.answer_id, status: "resolved" };
    render();
  })));
  cleanup.add(onEvent("question_closed", mine((d) => {
    if (question) question = { ...question, status: d.reason === "expired" ? "expired" : d.reason === "accepted" ? "resolved" : "closed" };
    render();
  })));
  const showGone = () => {
    question = null;
    title.textContent = t("q_deleted");
    chips.replaceChildren(); tags.replaceChildren(); body.textContent = meta.textContent = "";
    list.replaceChildren(); composer.replaceChildren(); controls.replaceChildren();
    composerMode = "none";
  };
  cleanup.add(onEvent("question_deleted", mine(showGone)));
  cleanup.add(onEvent("answer_deleted", mine((d) => { answers = answers.filter((a) => a.answer_id !== d.answer_id); renderAnswers(); })));
  cleanup.add(onEvent("user_online", mine((d) => {
    if (!online.some((p) => p.user_id === d.user_id)) { online = [...online, d]; onlineCount += 1; }
    renderPresence();
  })));
  cleanup.add(onEvent("user_offline", mine((d) => {
    if (online.some((p) => p.user_id === d.user_id)) { online = online.filter((p) => p.user_id !== d.user_id); onlineCount = Math.max(0, onlineCount - 1); }
    typing.delete(d.user_id);
    renderPresence();
  })));
  cleanup.add(onEvent("user_typing", mine((d) => { typing.set(d.user_id, d.nick); renderPresence(); })));
  cleanup.add(onEvent("user_stop_typing", mine((d) => { typing.delete(d.user_id); renderPresence(); })));
  cleanup.add(onEvent("receipt", mine((d) => {
    answers = answers.map((a) => (a.answer_id === d.answer_id ? { ...a, state: d.state } : a));
    renderAnswers();
  })));
  // Live events were missed while away: the SDK re-joins the room after a reconnect, and its
  // reply is the room as it is now. A room never joined (the first join was lost) is joined here.
  cleanup.add(onSession("rejoined", (r) => { if (r.question.question_id === id) show(r as unknown as Joined); }));
  // Not re-joined after a reconnect: deleted or hidden meanwhile (or refused again and again).
  cleanup.add(onSession("rejoin_failed", (r) => {
    if (r.question_id !== id || gone) return;
    if (r.error.code === "not_found") showGone();
    else join();
  }));
  cleanup.add(store.subscribe((s, prev) => {
    if (s.conn === "open" && prev.conn === "reconnecting" && question === null && !gone) join();
  }));
  cleanup.listen(document, "visibilitychange", markRead);
  cleanup.timer(() => { if (question) renderAnswers(); }, 30_000);
  return () => cleanup.run();
}
