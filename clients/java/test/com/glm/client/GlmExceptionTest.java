package com.glm.client;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertSame;

import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import org.junit.Test;

public final class GlmExceptionTest {
  // What grpc-netty reports for a stream Envoy cut after its reply began (the replica died).
  private static final String PROXY_CUT =
      "RST_STREAM closed stream. HTTP/2 error code: INTERNAL_ERROR";

  @Test
  public void aStreamCutByTheProxyIsUnavailableAndKeepsGrpcsCode() {
    StatusRuntimeException cut = Status.INTERNAL.withDescription(PROXY_CUT).asRuntimeException();
    GlmException error = GlmException.of(cut);
    assertEquals(Status.Code.UNAVAILABLE, error.getCode());
    assertEquals(Status.Code.INTERNAL, error.getGrpcCode());
    assertEquals(PROXY_CUT, error.getDescription());
    assertEquals("UNAVAILABLE: " + PROXY_CUT, error.getMessage());
    assertSame(cut, error.getCause());
  }

  @Test
  public void otherFailuresKeepGrpcsCode() {
    Status[] others = {
      // The server's own INTERNAL status (a bug), resets with other HTTP/2 codes, others.
      Status.INTERNAL.withDescription("an incident id"),
      Status.INTERNAL.withDescription("RST_STREAM closed stream. HTTP/2 error code: PROTOCOL_ERROR"),
      Status.INTERNAL.withDescription("RST_STREAM closed stream. HTTP/2 error code: NO_ERROR"),
      Status.INTERNAL,
      Status.RESOURCE_EXHAUSTED.withDescription(
          "RST_STREAM closed stream. HTTP/2 error code: ENHANCE_YOUR_CALM"),
      Status.UNAVAILABLE.withDescription("io exception"),
    };
    for (Status status : others) {
      GlmException error = GlmException.of(status.asException());
      assertEquals(status.toString(), status.getCode(), error.getCode());
      assertEquals(status.toString(), status.getCode(), error.getGrpcCode());
    }
  }
}
