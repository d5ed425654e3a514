/**
 * Full-jitter exponential backoff (as AWS and Centrifugo's SDKs do it).
 *
 * Retry n in a row waits a uniformly random time between 0 and
 * `min(maxMs, baseMs * 2**n)`: clients cut at the same moment spread their
 * reconnects. A delay the server suggests (`Retry-After`) is a floor.
 */
export interface BackoffOptions {
  /** The cap of the first delay (default 250 ms). */
  baseMs?: number;
  /** The cap of every delay (default 10 s). */
  maxMs?: number;
  /** Failed attempts in a row before giving up (default 20; `null`: never). */
  maxAttempts?: number | null;
  /** The random source, [0, 1) (default `Math.random`). */
  random?: () => number;
}

export class Backoff {
  readonly baseMs: number;
  readonly maxMs: number;
  readonly maxAttempts: number | null;
  private readonly random: () => number;

  constructor(options: BackoffOptions = {}) {
    this.baseMs = options.baseMs ?? 250;
    this.maxMs = options.maxMs ?? 10_000;
    this.maxAttempts = options.maxAttempts === undefined ? 20 : options.maxAttempts;
    this.random = options.random ?? Math.random;
    if (!(this.baseMs > 0 && this.baseMs <= this.maxMs)) {
      throw new RangeError("Backoff needs 0 < baseMs <= maxMs");
    }
    if (this.maxAttempts !== null && this.maxAttempts < 1) {
      throw new RangeError("Backoff.maxAttempts must be at least 1 (or null)");
    }
  }

  /** The upper bound of the delay before retry number `retry` (0 first). */
  cap(retry: number): number {
    return Math.min(this.maxMs, this.baseMs * 2 ** Math.min(retry, 62));
  }

  /** Full jitter under `cap(retry)`, never less than `suggestedMs` (capped by maxMs). */
  delay(retry: number, suggestedMs?: number | null): number {
    const jitter = this.random() * this.cap(retry);
    if (suggestedMs != null && suggestedMs > 0) {
      return Math.max(jitter, Math.min(suggestedMs, this.maxMs));
    }
    return jitter;
  }

  /** True when `attempts` failed attempts in a row are all that is allowed. */
  exhausted(attempts: number): boolean {
    return this.maxAttempts !== null && attempts >= this.maxAttempts;
  }
}
