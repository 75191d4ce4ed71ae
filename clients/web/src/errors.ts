// A failure in the user's language, by its wire code (PROTOCOL.md, "Error codes").
import { RequestError, errorCode, retryAfterMs } from "./api";
import { hasKey, t } from "./i18n";

export function errorText(err: unknown): string {
  const key = `err_${errorCode(err)}`;
  if (!hasKey(key)) return t("err_unknown");
  const max = err instanceof RequestError && typeof err.error.max === "number" ? err.error.max : "";
  return t(key, { s: Math.max(1, Math.ceil((retryAfterMs(err) ?? 1000) / 1000)), max });
}

/** Log what is not a refusal the user can act on (bugs show up in the console, refusals on screen). */
export function report(err: unknown): void {
  if (errorCode(err) === "unknown") console.error(err);
}
