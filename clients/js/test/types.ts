// Compile-time checks of the public types (`tsc -p test/tsconfig.json`, run by `npm test`):
// what must compile does, and each `@ts-expect-error` line must be an error.
import { connect, ConnectionLost, RequestError, SessionClosed } from "../src/index.js";
import type { Answer, HelloReply, Question, ServerEvent, SessionState, User, WebSocketConstructor } from "../src/index.js";

declare const NodeWs: WebSocketConstructor;
// The browser's own WebSocket fits the constructor the session takes.
connect("wss://host/ws", { getToken: () => "token", WebSocket: WebSocket });
const session = connect("wss://host/ws", {
  getToken: async () => "token",
  WebSocket: NodeWs,
  storage: { get: (k: string) => localStorage.getItem(k), set: (k: string, v: string) => localStorage.setItem(k, v) },
  backoff: { base: 1000, factor: 2, max: 16000, jitter: "full" },
  maxAttempts: null,
});

export async function usage(): Promise<void> {
  const hello: HelloReply = await session.opened;
  const me: User = hello.user;
  const { question } = await session.request("create_question", { title: "t", location: { lat: 33.5, lng: 126.5 } });
  const q: Question = question;
  const { answer } = await session.request("create_answer", { question_id: q.question_id, content: "c" });
  const a: Answer = answer;
  await session.request("ping");
  await session.request("nearby_locals");
  await session.request("update_settings", { quiet_hours: [22, 7] });
  const page = await session.request("list_notifications", { limit: 10, types: ["answer_notification"] });
  const seq: number = page.notifications[0]!.seq;
  // @ts-expect-error: title is required
  await session.request("create_question", { location: { lat: 33.5, lng: 126.5 } });
  // @ts-expect-error: no such operation
  await session.request("no_such_op", {});
  // @ts-expect-error: join_question needs its question_id
  await session.request("join_question");
  // @ts-expect-error: urgency is "normal" | "urgent"
  await session.request("create_question", { title: "t", location: { lat: 1, lng: 2 }, urgency: "asap" });

  const off: () => void = session.on("answer_notification", (ev) => {
    const durable: number = ev.seq;
    // @ts-expect-error: a replayed one may be removed (its answer deleted or hidden): test data.removed first
    void ev.data.answer.content;
    const content: string = ev.data.removed ? "" : ev.data.answer.content;
    void [durable, content];
  });
  session.on("new_answer", (ev) => {
    // @ts-expect-error: live events carry no seq
    const live: number = ev.seq;
    void live;
  });
  session.on("state", (state) => {
    const s: SessionState = state;
    void s;
  });
  session.on("event", (ev: ServerEvent) => void ev.type);
  session.on("closed", (error) => void (error.code === 4003));
  // @ts-expect-error: no such event
  session.on("answer_notifications", () => {});
  off();

  try {
    await session.request("get_profile");
  } catch (error) {
    if (error instanceof RequestError) void [error.code, error.message, error.field, error.retryAfterMs];
    else if (error instanceof ConnectionLost) void error.message;
    else if (error instanceof SessionClosed) void [error.code, error.reason];
  }
  const last: number = session.lastSeq;
  const state: SessionState = session.state;
  void [me, a, seq, last, state];
  await session.close();
}
