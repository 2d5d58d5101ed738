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

/** A call that ended with a status other than OK: `code` says which, `message` says why. */
export class GlmError extends Error {
  override readonly name = "GlmError";

  constructor(
    readonly code: Code,
    readonly details: string,
    options?: { cause?: unknown },
  ) {
    super(`${Code[code] ?? code}: ${details}`, options);
  }

  /** The status code's name, e.g. "NOT_FOUND". */
  get codeName(): string {
    return Code[this.code] ?? String(this.code);
  }
}
