// Requests whose fate is unknown: sent, then no reply (the connection dropped, or the reply was slower
// than the SDK's timeout). The server may have applied them; sending again could post twice (and alert
// the locals twice), so the app looks for what it sent first.
import { call, ConnectionLost, RequestTimeout } from "./api";
import type { Answer } from "./types";

const ENTITIES: Record<string, string> = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", nbsp: "\u00a0" };

/** Whether a failed request may have been applied by the server: sent and unanswered, not refused or unsent. */
export function mayHaveApplied(err: unknown): boolean {
  return (err instanceof ConnectionLost && err.sent) || err instanceof RequestTimeout;
}

/**
 * Whether a stored text is the one sent. The server stores user text normalised (NFC, invisible and
 * control characters dropped, markup removed, entities decoded: dongne/core/text.py), so a look-up by
 * the text sent compares both that way.
 */
export function sameText(stored: string, sent: string): boolean {
  const plain = (text: string) =>
    text
      .normalize("NFC")
      .replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b-\u200d\u2060\ufeff\u202a-\u202e\u2066-\u2069]/g, "")
      .replace(/<[^>]*>/g, "")
      .replace(/&(#x[0-9a-f]+|#[0-9]+|[a-z]+);/gi, (entity, name: string) => {
        if (name[0] !== "#") return ENTITIES[name.toLowerCase()] ?? entity;
        const code = name[1] === "x" || name[1] === "X" ? parseInt(name.slice(2), 16) : parseInt(name.slice(1), 10);
        return code > 0 && code <= 0x10ffff ? String.fromCodePoint(code) : entity;
      })
      .replace(/\s+/g, " ")
      .trim();
  return plain(stored) === plain(sent);
}

/** Pages read looking for an answer (100 answers each); an answer is found among the newest. */
const PAGES = 20;

/**
 * My answer with this content to the question, if the server has it (`get_question`, every page: answers
 * come oldest first). Rejects as `get_question` does.
 */
export async function findMyAnswer(questionId: string, me: string, content: string): Promise<Answer | null> {
  let after: string | null = null;
  let found: Answer | null = null;
  for (let page = 0; page < PAGES; page++) {
    const r: Awaited<ReturnType<typeof call<"get_question">>> =
      await call("get_question", { question_id: questionId, limit: 100, ...(after ? { answers_after: after } : {}) });
    for (const a of r.answers) if (a.author_id === me && sameText(a.content, content)) found = a;
    if (!r.next) break;
    after = r.next;
  }
  return found;
}
