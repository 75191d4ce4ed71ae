// The protocol's types come from the SDK (which mirrors PROTOCOL.md); this module names the
// few the app uses and adds what the app itself reads (config.json, regions.geojson).
import type * as P from "dongne-client";

export type Loc = P.Location;
export type User = P.User;
export type PublicUser = P.PublicUser;
export type Status = P.QuestionStatus;
export type Urgency = P.Urgency;
export type Person = P.Presence;
export type Settings = P.Settings;
/** A question; `my_questions` adds how many of its answers are unread. */
export type Question = P.Question & { unread_answers?: number };
/** An answer; `my_answers` adds its question's title and status. */
export type Answer = P.Answer & { question_title?: string; question_status?: Status };
/** A `nearby` item, or the question inside an alert (which has no distance or status). */
export type Nearby = P.AlertQuestion & Partial<Pick<P.NearbyQuestion, "distance_m" | "status" | "answer_count">>;
export type NewQuestionAlert = P.NewQuestionNotification;
export type Notification_ = P.Notification;

/** Every operation: [request data, reply data]. */
export type Ops = { [K in P.Operation]: [P.RequestData<K>, P.ReplyData<K>] };
/** Every event's data. */
export type Events = P.EventData;

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
