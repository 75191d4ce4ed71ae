// What the app reads from the server, as PROTOCOL.md describes it (only the fields it uses).

export interface Loc { lat: number; lng: number }

export interface User {
  user_id: string; nick: string; local: boolean; tags: string[]; role: string; points: number;
}

export type Status = "open" | "answered" | "resolved" | "closed" | "expired";
export type Urgency = "normal" | "urgent";

export interface Question {
  question_id: string; asker_id: string; asker_nick: string; title: string; body: string;
  location: Loc; region: string; hashtags: string[]; urgency: Urgency; status: Status;
  created_at: number; accepted_answer_id: string | null; answer_count: number;
  first_answer_at: number | null; closed_at: number | null; unread_answers?: number;
}

export interface Answer {
  answer_id: string; question_id: string; author_id: string; author_nick: string; content: string;
  created_at: number; state: "sent" | "delivered" | "read"; accepted: boolean;
  author_local: boolean; author_points: number; question_title?: string; question_status?: Status;
}

/** A `nearby` item (PROTOCOL.md, `nearby_questions`); alerts carry one without distance and status. */
export interface Nearby {
  question_id: string; title: string; location: Loc; region: string; hashtags: string[];
  urgency: Urgency; created_at: number; asker_nick: string;
  distance_m?: number; status?: Status; answer_count?: number;
}

export interface Settings {
  immediate_alerts: boolean; quiet_hours: [number, number] | null; max_alerts_per_hour: number; home: Loc | null;
}

export interface Person { user_id: string; nick: string }

export interface PublicUser extends User { answers_given: number; answers_accepted: number; member_since: number }

export interface NewQuestionAlert {
  question_id: string; question: Nearby; stage: string; priority: string;
  distance_m: number | null; sound: "urgent" | "normal"; vibration: "strong" | "light";
}

export interface AnswerNotification { question_id: string; question_title: string; answer: Answer }
export interface AcceptedNotification {
  question_id: string; answer_id: string; author_id: string; points: number; question_title: string; total_points: number;
}
export interface ContentHidden { question_id: string; answer_id?: string; reason: string }

export type DurableType = "answer_notification" | "answer_accepted_notification" | "new_question_notification"
  | "slow_response_alert" | "content_hidden";

export interface Notification_ { seq: number; type: DurableType; data: Record<string, unknown>; created_at: number; read: boolean }

/** Every operation the app sends: [request data, reply data]. */
export interface Ops {
  get_profile: [Record<string, never>, { user: User; last_seq: number }];
  get_user: [{ user_id: string }, { user: PublicUser }];
  create_question: [{ title: string; body?: string; location: Loc; hashtags?: string[]; urgency?: Urgency }, { question: Question }];
  join_question: [{ question_id: string }, { question: Question; answers: Answer[]; online: Person[]; online_count: number; typing: Person[] }];
  leave_question: [{ question_id: string }, { question_id: string }];
  get_question: [{ question_id: string; answers_after?: string; limit?: number }, { question: Question; answers: Answer[]; next: string | null }];
  create_answer: [{ question_id: string; content: string }, { answer: Answer }];
  accept_answer: [{ question_id: string; answer_id: string }, { question: Question; answer: Answer }];
  close_question: [{ question_id: string }, { question: Question }];
  typing_start: [{ question_id: string }, { question_id: string; expires_at: number }];
  typing_stop: [{ question_id: string }, { question_id: string }];
  mark_read: [{ question_id: string; answer_ids?: string[] }, { question_id: string; answer_ids: string[] }];
  my_questions: [{ status?: "open" | "answered" | "closed" | "all"; before?: string; limit?: number }, { questions: Question[]; next: string | null }];
  my_answers: [{ before?: string; limit?: number }, { answers: Answer[]; next: string | null }];
  list_notifications: [{ before_seq?: number; limit?: number }, { notifications: Notification_[]; next_before_seq: number | null; unread: number }];
  mark_notifications_read: [{ up_to_seq: number }, { unread: number }];
  update_location: [{ location: Loc; accuracy_m?: number }, { location: Loc; region: string; live: boolean }];
  nearby_questions: [{ location?: Loc }, { questions: Nearby[] }];
  nearby_locals: [{ location?: Loc }, { within_2km: number; within_5km: number }];
  get_settings: [Record<string, never>, { settings: Settings }];
  update_settings: [Partial<Settings>, { settings: Settings }];
}

/** Every event the app listens to, with its data. */
export interface Events {
  answer_notification: AnswerNotification;
  answer_accepted_notification: AcceptedNotification;
  new_question_notification: NewQuestionAlert;
  content_hidden: ContentHidden;
  new_answer: { question_id: string; answer: Answer };
  answer_accepted: { question_id: string; answer_id: string; author_id: string; points: number };
  question_closed: { question_id: string; reason: "closed" | "accepted" | "expired" };
  question_deleted: { question_id: string };
  answer_deleted: { question_id: string; answer_id: string };
  unread_count: { unread: number };
  user_online: Person & { question_id: string };
  user_offline: Person & { question_id: string };
  user_typing: Person & { question_id: string };
  user_stop_typing: Person & { question_id: string };
  receipt: { question_id: string; answer_id: string; state: "delivered" | "read"; at: number };
  nearby_questions: { questions: Nearby[] };
}

export interface WebConfig {
  ws_path: string; tile_url: string; tile_attribution: string; token_url: string;
  min_update_interval_s: number; protocol: number;
}

export interface RegionFeature {
  type: "Feature";
  properties: { name: string; name_ko?: string; name_en?: string };
  geometry: { type: "Polygon"; coordinates: number[][][] } | { type: "MultiPolygon"; coordinates: number[][][][] };
}
export interface Regions { type: "FeatureCollection"; features: RegionFeature[] }
