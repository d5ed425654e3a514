/**
 * The errors the client raises, and which closes and refusals it retries (the
 * server's rule, docs/errors.md "Close codes"): 4000-4499 resume, 4500-4999 and
 * 1008 are terminal, other standard codes (1006 for a dropped socket, 1011,
 * 1012 for a drain, 1013) resume. At the handshake 400, 401, 403, 404 and 410
 * are terminal (401 after one refresh from a token provider); 429 and 5xx are
 * retried after the server's `Retry-After`.
 */

export const INVALID_API_KEY_CLOSE = 4501;

export class SwitchboardClientError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** The client was closed by `close()`. */
export class ClientClosed extends SwitchboardClientError {}

export interface TerminalDetails {
  code: string;
  closeCode?: number | null;
  status?: number | null;
}

/** The server refused in a way no reconnect can cure; the client stopped. */
export class TerminalError extends SwitchboardClientError {
  readonly code: string;
  readonly closeCode: number | null;
  readonly status: number | null;

  constructor(message: string, details: TerminalDetails) {
    super(message);
    this.code = details.code;
    this.closeCode = details.closeCode ?? null;
    this.status = details.status ?? null;
  }
}

export class AuthenticationError extends TerminalError {}
export class PermissionDenied extends TerminalError {}
export class SessionNotFound extends TerminalError {}
export class SessionTakenOver extends TerminalError {}
export class QuotaExceeded extends TerminalError {}
export class ResumeUnavailable extends TerminalError {}

/** Every reconnect allowed by the backoff's `maxAttempts` failed. */
export class GaveUp extends SwitchboardClientError {
  readonly attempts: number;
  constructor(message: string, attempts: number) {
    super(message);
    this.attempts = attempts;
  }
}

/** The server answered a client event of `streamText` with an `error`. */
export class RequestFailed extends SwitchboardClientError {
  readonly code: string;
  constructor(code: string, message: string) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

type TerminalKind = new (message: string, details: TerminalDetails) => TerminalError;

const BY_CLOSE: Record<number, TerminalKind> = {
  4501: AuthenticationError,
  4503: PermissionDenied,
  4504: SessionNotFound,
  4509: SessionTakenOver,
  4529: QuotaExceeded,
};

const BY_STATUS: Record<number, TerminalKind> = {
  401: AuthenticationError,
  403: PermissionDenied,
  404: SessionNotFound,
  410: ResumeUnavailable,
};

/** True when a connection closed with `code` must not be resumed (null: dropped). */
export function closeIsTerminal(code: number | null): boolean {
  if (code === null) return false;
  return code === 1008 || (code >= 4500 && code <= 4999);
}

export function statusIsTerminal(status: number): boolean {
  return status in BY_STATUS || status === 400;
}

export function terminalClose(code: number, reason: string): TerminalError {
  const Kind = BY_CLOSE[code] ?? TerminalError;
  return new Kind(`the server closed the connection: ${code} ${reason}`, {
    code: reason,
    closeCode: code,
  });
}

export function terminalStatus(status: number, code: string, message: string): TerminalError {
  const Kind = BY_STATUS[status] ?? TerminalError;
  return new Kind(`the server refused the connection: ${status} ${code}: ${message}`, {
    code,
    status,
  });
}
