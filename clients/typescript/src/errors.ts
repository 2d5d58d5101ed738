// The errors of a glm-api call, the same whatever transport carried it.

/** gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html). */
export enum Code {
  OK = 0,
  CANCELLED = 1,
  UNKNOWN = 2,
  INVALID_ARGUMENT = 3,
  DEADLINE_EXCEEDED = 4,
  NOT_FOUND = 5,
  ALREADY_EXISTS = 6,
  PERMISSION_DENIED = 7,
  RESOURCE_EXHAUSTED = 8,
  FAILED_PRECONDITION = 9,
  ABORTED = 10,
  OUT_OF_RANGE = 11,
  UNIMPLEMENTED = 12,
  INTERNAL = 13,
  UNAVAILABLE = 14,
  DATA_LOSS = 15,
  UNAUTHENTICATED = 16,
}

// How @grpc/grpc-js words a stream its peer reset (an HTTP/2 RST_STREAM) before the call's status
// came, with the HTTP/2 code it carried (subchannel-call.ts: "Received RST_STREAM with code N",
// then " (Internal server error)"). " triggered by internal client error" marks a reset this
// client made itself, which is not the peer's.
const PEER_RESET = /\bReceived RST_STREAM with code (\d+)\b(?! triggered by internal client error)/;
// HTTP/2's INTERNAL_ERROR: the code Envoy resets a stream with when it must end it after the reply
// began, e.g. because the server behind it died.
const HTTP2_INTERNAL_ERROR = 2;

/** Whether a failure is a stream that a proxy cut with HTTP/2's INTERNAL_ERROR (gRPC: INTERNAL). */
export function cutByProxy(code: Code, details: string): boolean {
  if (code !== Code.INTERNAL) return false;
  const reset = PEER_RESET.exec(details);
  return reset !== null && Number(reset[1]) === HTTP2_INTERNAL_ERROR;
}

/**
 * A call that ended with a status other than OK: `code` says which, `message` says why.
 *
 * One failure has another code than gRPC's: a stream its peer reset with HTTP/2's INTERNAL_ERROR,
 * which gRPC reports as INTERNAL, is UNAVAILABLE here. That reset is how Envoy ends a call whose
 * reply had begun when the server behind it was lost; over a direct connection the same loss is
 * UNAVAILABLE already. The call may be made again. `grpcCode` keeps INTERNAL.
 */
export class GlmError extends Error {
  override readonly name = "GlmError";
  /** The code gRPC reported: `code`, except for a stream cut as above. */
  readonly grpcCode: Code;

  constructor(
    readonly code: Code,
    readonly details: string,
    options?: { cause?: unknown; grpcCode?: Code },
  ) {
    super(`${Code[code] ?? code}: ${details}`, options);
    this.grpcCode = options?.grpcCode ?? code;
  }

  /** The error of a call that gRPC ended with `code` and `details`. */
  static fromStatus(code: Code, details: string, options?: { cause?: unknown }): GlmError {
    if (cutByProxy(code, details)) {
      return new GlmError(Code.UNAVAILABLE, details, { ...options, grpcCode: code });
    }
    return new GlmError(code, details, options);
  }

  /** The status code's name, e.g. "NOT_FOUND". */
  get codeName(): string {
    return Code[this.code] ?? String(this.code);
  }
}
