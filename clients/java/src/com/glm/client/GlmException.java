package com.glm.client;

import io.grpc.Status;
import io.grpc.StatusException;
import io.grpc.StatusRuntimeException;
import java.util.regex.Pattern;

/**
 * A call to glm-api that failed with a gRPC status other than OK.
 *
 * <p>One failure has another code than gRPC's: a stream its peer reset with HTTP/2's
 * INTERNAL_ERROR, which grpc-java reports as INTERNAL, is UNAVAILABLE here. That reset is how Envoy
 * ends a call whose reply had begun when the server behind it was lost; over a direct connection
 * the same loss is UNAVAILABLE already. The call may be made again; the responses already received
 * stand. {@link #getGrpcCode()} keeps INTERNAL, and the cause is gRPC's exception.
 */
public final class GlmException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  // How grpc-netty words a stream its peer reset before the call's status came:
  // NettyClientHandler.onRstStreamRead gives "RST_STREAM closed stream", to which
  // statusFromH2Error adds GrpcUtil.Http2Error's "HTTP/2 error code: <name>".
  private static final Pattern PEER_RESET =
      Pattern.compile("\\bRST_STREAM closed stream\\. HTTP/2 error code: INTERNAL_ERROR\\b");

  private final Status.Code code;
  private final Status.Code grpcCode;
  private final String description;

  public GlmException(Status.Code code, String description, Status.Code grpcCode, Throwable cause) {
    super(code.name() + ": " + description, cause);
    this.code = code;
    this.description = description;
    this.grpcCode = grpcCode;
  }

  /** The failure of a call that gRPC ended with {@code status}; {@code cause} is gRPC's error. */
  public static GlmException of(Status status, Throwable cause) {
    String description = status.getDescription() == null ? "" : status.getDescription();
    Status.Code code = cutByProxy(status) ? Status.Code.UNAVAILABLE : status.getCode();
    return new GlmException(code, description, status.getCode(), cause);
  }

  /** The failure {@code error} reports (from a blocking or async stub). */
  public static GlmException of(StatusRuntimeException error) {
    return of(error.getStatus(), error);
  }

  /** The failure {@code error} reports (from a future stub). */
  public static GlmException of(StatusException error) {
    return of(error.getStatus(), error);
  }

  /** Whether a failure is a stream that a proxy cut with HTTP/2's INTERNAL_ERROR. */
  static boolean cutByProxy(Status status) {
    String description = status.getDescription();
    return status.getCode() == Status.Code.INTERNAL
        && description != null
        && PEER_RESET.matcher(description).find();
  }

  /** The status code, e.g. NOT_FOUND. */
  public Status.Code getCode() {
    return code;
  }

  /** The code gRPC reported: {@link #getCode()}, except for a stream cut as above. */
  public Status.Code getGrpcCode() {
    return grpcCode;
  }

  /** The status message the server (or the gRPC runtime) gave. */
  public String getDescription() {
    return description;
  }
}
