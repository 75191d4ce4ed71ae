/** Reconnection delays: exponential backoff with full jitter. */

export interface BackoffOptions {
  /** The ceiling of the first wait, ms (default 1000). */
  base?: number;
  /** How much the ceiling grows per attempt (default 2). */
  factor?: number;
  /** The largest ceiling, ms (default 16000). */
  max?: number;
  /** `"full"` (default): a uniform wait in [0, ceiling); `"none"`: the ceiling itself. */
  jitter?: "full" | "none";
}

/**
 * The wait before the `attempt`-th attempt in a row (1-based):
 * `random() * min(max, base * factor ** (attempt - 1))`. Clients dropped
 * together (a server restart) so come back spread out.
 */
export function backoffDelay(attempt: number, options: BackoffOptions = {}, random: () => number = Math.random): number {
  const { base = 1000, factor = 2, max = 16000, jitter = "full" } = options;
  // The exponent is capped: factor ** n leaves the floats long after max is reached.
  const ceiling = Math.min(max, base * factor ** Math.min(Math.max(attempt - 1, 0), 64));
  return jitter === "none" ? ceiling : ceiling * random();
}
