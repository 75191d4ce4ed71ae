/**
 * The wire protocol's types, mirroring PROTOCOL.md (protocol v1): every
 * operation with its request data and reply data, every event with its data.
 *
 * Types, plus the close codes as constants. Fields the server may add later
 * are not listed; `unknown` marks what PROTOCOL.md leaves open.
 */

/** Integer milliseconds since the Unix epoch (UTC). */
export type Millis = number;
/** An opaque, signed page cursor: pass it back as it came. */
export type Cursor = string;

export interface Location {
  lat: number;
  lng: number;
}

export type Role = "user" | "admin";

/** Your own profile (`hello`, `get_profile`). */
export interface User {
  user_id: string;
  nick: string;
  local: boolean;
  tags: string[];
  role: Role;
  points: number;
}

/** Someone's public profile (`get_user`). */
export interface PublicUser {
  user_id: string;
  nick: string;
  local: boolean;
  tags: string[];
  points: number;
  answers_given: number;
  answers_accepted: number;
  member_since: Millis;
}

export type QuestionStatus = "open" | "answered" | "resolved" | "closed" | "expired";
export type Urgency = "normal" | "urgent";

export interface Question {
  question_id: string;
  asker_id: string;
  asker_nick: string;
  title: string;
  body: string;
  location: Location;
  region: string;
  hashtags: string[];
  urgency: Urgency;
  status: QuestionStatus;
  created_at: Millis;
  accepted_answer_id: string | null;
  answer_count: number;
  first_answer_at: Millis | null;
  closed_at: Millis | null;
}

export type AnswerState = "sent" | "delivered" | "read";

export interface Answer {
  answer_id: string;
  question_id: string;
  author_id: string;
  author_nick: string;
  content: string;
  created_at: Millis;
  state: AnswerState;
  accepted: boolean;
  author_local: boolean;
  author_points: number;
}

/** A question near a position (`nearby_questions`). */
export interface NearbyQuestion {
  question_id: string;
  title: string;
  location: Location;
  region: string;
  hashtags: string[];
  urgency: Urgency;
  created_at: Millis;
  asker_nick: string;
  distance_m: number;
  status: QuestionStatus;
  answer_count: number;
}

/** The question inside a `new_question_notification`: a nearby item without distance and status. */
export type AlertQuestion = Omit<NearbyQuestion, "distance_m" | "status" | "answer_count"> &
  Partial<Pick<NearbyQuestion, "answer_count">>;

export interface Presence {
  user_id: string;
  nick: string;
}

export interface Settings {
  immediate_alerts: boolean;
  quiet_hours: [number, number] | null;
  max_alerts_per_hour: number;
  home: Location | null;
}

export type Stage = "IMMEDIATE" | "QUICK" | "EXTENDED" | "FINAL" | (string & {});
export type Priority = "low" | "normal" | "high" | "critical";
export type Sound = "normal" | "urgent";
export type Vibration = "light" | "strong";

export type DurableEventType =
  | "answer_notification"
  | "answer_accepted_notification"
  | "new_question_notification"
  | "slow_response_alert"
  | "content_hidden";

/** An entry of `list_notifications`. */
export interface Notification<K extends DurableEventType = DurableEventType> {
  seq: number;
  type: K;
  data: EventData[K];
  created_at: Millis;
  read: boolean;
}

export interface Report {
  report_id: string;
  reason: ReportReason;
  note: string;
  reporter_id: string;
  created_at: Millis;
  status: "open" | "resolved";
  action: string | null;
  resolved_by: string | null;
  resolved_at: Millis | null;
  item: { kind: "question" | "answer"; id: string; question_id: string; text: string; author_id: string; hidden: boolean };
}

export type ReportReason = "spam" | "abuse" | "wrong" | "other";

export interface IpBlock {
  cidr: string;
  until: Millis | null;
  reason: string;
  admin_id: string;
  created_at: Millis;
}

export interface SloFigures {
  questions: number;
  within_1m: number | null;
  decided_1m: number;
  within_5m: number | null;
  decided_5m: number;
  within_10m: number | null;
  decided_10m: number;
  answered: number;
  avg_first_answer_s: number | null;
  p90_first_answer_s: number | null;
}

/** The reply to `hello` (available as `session.hello`). */
export interface HelloReply {
  user: User;
  last_seq: number;
  unread: number;
  server_time: Millis;
  protocol: number;
  /** Present when the hello resumed: whether the replay is whole. */
  resumed?: boolean;
  /** With `resumed: false`: the oldest durable seq the server still keeps. */
  oldest_seq?: number;
}

type QuestionId = { question_id: string };
/** Data for operations that take none. */
export type Empty = Record<string, never>;

/** Every operation: its request `data` and its reply `data`. */
export interface Operations {
  create_question: {
    request: { title: string; body?: string; location: Location; hashtags?: string[]; urgency?: Urgency };
    /** `joined`: whether this connection joined the question's room (not when at its cap of rooms). */
    reply: { question: Question; joined: boolean };
  };
  join_question: {
    request: QuestionId;
    reply: { question: Question; answers: Answer[]; online: Presence[]; online_count: number; typing: Presence[] };
  };
  leave_question: { request: QuestionId; reply: QuestionId };
  create_answer: { request: { question_id: string; content: string }; reply: { answer: Answer } };
  accept_answer: { request: { question_id: string; answer_id: string }; reply: { question: Question; answer: Answer } };
  close_question: { request: QuestionId; reply: { question: Question } };
  delete_question: { request: QuestionId; reply: QuestionId };
  delete_answer: { request: { answer_id: string }; reply: { question_id: string; answer_id: string } };
  typing_start: { request: QuestionId; reply: { question_id: string; expires_at: Millis } };
  typing_stop: { request: QuestionId; reply: QuestionId };
  mark_read: { request: { question_id: string; answer_ids?: string[] }; reply: { question_id: string; answer_ids: string[] } };
  get_profile: { request: Empty; reply: { user: User; last_seq: number } };
  ping: { request: Empty; reply: { server_time: Millis } };
  get_question: {
    request: { question_id: string; answers_after?: Cursor; limit?: number };
    reply: { question: Question; answers: Answer[]; next: Cursor | null };
  };
  my_questions: {
    request: { status?: "open" | "answered" | "closed" | "all"; before?: Cursor; limit?: number };
    reply: { questions: (Question & { unread_answers: number })[]; next: Cursor | null };
  };
  my_answers: {
    request: { before?: Cursor; limit?: number };
    reply: { answers: (Answer & { question_title: string; question_status: QuestionStatus })[]; next: Cursor | null };
  };
  browse_questions: {
    request: { region?: string; hashtag?: string; status?: "open" | "all"; before?: Cursor; limit?: number };
    reply: { questions: Question[]; next: Cursor | null };
  };
  get_user: { request: { user_id: string }; reply: { user: PublicUser } };
  list_notifications: {
    request: { before_seq?: number; limit?: number; types?: DurableEventType[] };
    reply: { notifications: Notification[]; next_before_seq: number | null; unread: number };
  };
  mark_notifications_read: { request: { up_to_seq: number }; reply: { unread: number } };
  update_location: {
    request: { location: Location; accuracy_m?: number };
    reply: { location: Location; region: string; live: boolean };
  };
  nearby_questions: { request: { location?: Location }; reply: { questions: NearbyQuestion[] } };
  nearby_locals: { request: { location?: Location }; reply: { within_2km: number; within_5km: number } };
  get_settings: { request: Empty; reply: { settings: Settings } };
  update_settings: { request: Partial<Settings>; reply: { settings: Settings } };
  trending: {
    request: { region?: string; limit?: number };
    reply: {
      region: string | null;
      now_ms: Millis;
      windows: { "15m": [string, number][]; "1h": [string, number][]; "1d": [string, number][] };
    };
  };
  report_content: {
    request: ({ question_id: string; answer_id?: never } | { answer_id: string; question_id?: never }) & {
      reason: ReportReason;
      note?: string;
    };
    reply: { report_id: string; status: "open" | "resolved" };
  };
  // ---- admins only ----
  hotspots: {
    request: { limit?: number };
    reply: {
      now_ms: Millis;
      window_ms: number;
      cells: { cell: [number, number]; centre_lat: number; centre_lng: number; bounds: Record<string, number>; questions: number; open: number; askers: number }[];
      hotspots: { name: string; name_ko: string; region: string; questions: number; open: number; askers: number }[];
      regions: { region: string; open_questions: number; online_locals: number; ratio: number | null }[];
    };
  };
  metrics: {
    request: Empty;
    reply: {
      slo: { window_days: number; overall: SloFigures; urgent: SloFigures; regions: Record<string, SloFigures> };
      recent_alerts: (SlowResponseAlert & Record<string, unknown>)[];
      connections: number;
      users_online: number;
      locals_online: number;
      open_questions: number;
    };
  };
  ban_user: { request: { user_id: string; reason: string; until?: Millis }; reply: { user_id: string; banned_until: Millis | null } };
  unban_user: { request: { user_id: string; reason?: string }; reply: { user_id: string; banned_until: null } };
  hide_question: { request: { id: string; reason: string }; reply: { id: string; hidden: boolean; changed: boolean } };
  hide_answer: { request: { id: string; reason: string }; reply: { id: string; hidden: boolean; changed: boolean } };
  unhide_question: { request: { id: string }; reply: { id: string; hidden: boolean; changed: boolean } };
  unhide_answer: { request: { id: string }; reply: { id: string; hidden: boolean; changed: boolean } };
  list_reports: {
    request: { status?: "open" | "resolved" | "all"; before?: Cursor; limit?: number };
    reply: { reports: Report[]; next: Cursor | null };
  };
  resolve_report: {
    request: { report_id: string; action: "dismiss" | "hide" | "ban" };
    reply: { report_id: string; action: "dismiss" | "hide" | "ban"; resolved: number };
  };
  block_ip: { request: { cidr: string; reason: string; until?: Millis }; reply: { block: IpBlock } };
  unblock_ip: { request: { cidr: string; reason?: string }; reply: { cidr: string } };
  list_ip_blocks: { request: Empty; reply: { blocks: IpBlock[]; static: string[] } };
  list_audit: {
    request: { before?: number; limit?: number };
    reply: {
      entries: { id: number; at: Millis; admin_id: string; action: string; target: string; reason: string | null }[];
      next: number | null;
    };
  };
}

export type Operation = keyof Operations;
export type RequestData<K extends Operation> = Operations[K]["request"];
export type ReplyData<K extends Operation> = Operations[K]["reply"];

export interface AnswerNotification {
  question_id: string;
  question_title: string;
  answer: Answer;
  removed?: never;
}
export interface AnswerAcceptedNotification {
  question_id: string;
  answer_id: string;
  author_id: string;
  points: number;
  question_title: string;
  total_points: number;
  removed?: never;
}
export interface NewQuestionNotification {
  question_id: string;
  question: AlertQuestion;
  stage: Stage;
  priority: Priority;
  distance_m: number | null;
  sound: Sound;
  vibration: Vibration;
  removed?: never;
}
export interface SlowResponseAlert {
  question_id: string;
  question: Partial<Question> & { question_id: string };
  age_s: number;
  threshold_s: number;
  stage: Stage | null;
  notified: number | null;
  raised_at: Millis;
  removed?: never;
}
/**
 * A durable event's `data` once the question it is about, or the answer it names, was deleted or
 * hidden: listed or replayed, it keeps its seq but only these ids (PROTOCOL.md, "Removed content").
 * Live events never come this way; test `data.removed` before reading the usual fields.
 */
export interface Removed {
  question_id: string;
  answer_id?: string;
  removed: true;
}
type RoomPresence = { question_id: string; user_id: string; nick: string };

/** Every event the server sends: its `data`. */
export interface EventData {
  answer_notification: AnswerNotification | Removed;
  answer_accepted_notification: AnswerAcceptedNotification | Removed;
  new_question_notification: NewQuestionNotification | Removed;
  slow_response_alert: SlowResponseAlert | Removed;
  content_hidden: { question_id: string; answer_id?: string; reason: string };
  new_answer: { question_id: string; answer: Answer };
  answer_accepted: { question_id: string; answer_id: string; author_id: string; points: number };
  question_closed: { question_id: string; reason: "closed" | "accepted" | "expired" };
  question_deleted: QuestionId;
  answer_deleted: { question_id: string; answer_id: string };
  unread_count: { unread: number };
  user_online: RoomPresence;
  user_offline: RoomPresence;
  user_typing: RoomPresence;
  user_stop_typing: RoomPresence;
  receipt: { question_id: string; answer_id: string; state: "delivered" | "read"; at: Millis };
  nearby_questions: { questions: NearbyQuestion[] };
  storage_alert: { state: "failing" | "recovered"; error: string; at: Millis };
}

export type EventType = keyof EventData;

/** An event as handlers receive it: durable events carry their `seq`. */
export type ServerEvent<K extends EventType = EventType> = {
  [T in K]: T extends DurableEventType
    ? { type: T; seq: number; data: EventData[T] }
    : { type: T; seq?: undefined; data: EventData[T] };
}[K];

/** The error map of a refused request (`RequestError.error`). */
export interface WireError {
  code: ErrorCode;
  message: string;
  field?: string;
  max?: number;
  retry_after_ms?: number;
  [extra: string]: unknown;
}

export type ErrorCode =
  | "bad_frame"
  | "unknown_op"
  | "already_authenticated"
  | "invalid_field"
  | "too_long"
  | "invalid_location"
  | "outside_service_area"
  | "not_found"
  | "forbidden"
  | "not_joined"
  | "rate_limited"
  | "spam"
  | "limit_exceeded"
  | "already_accepted"
  | "question_closed"
  | "conflict"
  | "internal"
  | "unavailable"
  | (string & {});

/** Close codes (PROTOCOL.md, "Close codes"). */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  ABNORMAL: 1006,
  INVALID_DATA: 1007,
  TOO_BIG: 1009,
  TRY_AGAIN_LATER: 1013,
  AUTHENTICATION_FAILED: 4001,
  BAD_RESUME: 4002,
  BANNED: 4003,
  POLICY: 4008,
  SLOW_CONSUMER: 4009,
} as const;
