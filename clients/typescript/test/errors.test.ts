// GlmError's codes, checked on what @grpc/grpc-js reports when a real HTTP/2 peer ends a Chat
// stream after its first message: a reset with INTERNAL_ERROR (what Envoy sends when the server
// behind it dies) is UNAVAILABLE; other resets and a server's own INTERNAL status stay as they are.
import assert from "node:assert/strict";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { after, before, test } from "node:test";

import { Code, GlmError } from "../src/errors.js";
import { connect } from "../src/node.js";

// One empty ChatResponse as a gRPC message: uncompressed, zero bytes long.
const EMPTY_MESSAGE = Buffer.from([0, 0, 0, 0, 0]);

// Sends RST_STREAM with `code` on a stream whose reply is under way, as Envoy does. Node's
// stream.close() ends the writable side first, and the stream, half-closed by the client already,
// is then over before the reset leaves; the native handle's rstStream sends the reset alone.
function reset(stream: http2.ServerHttp2Stream, code: number): void {
  const fields = stream as unknown as Record<symbol, { rstStream?: unknown } | undefined>;
  const handle = Object.getOwnPropertySymbols(stream)
    .map((key) => fields[key])
    .find((value) => typeof value?.rstStream === "function");
  (handle as { rstStream(code: number): void }).rstStream(code);
}

// How the peer ends each call, by the prompt the test sends.
const endings: Record<string, (stream: http2.ServerHttp2Stream) => void> = {
  "reset internal": (s) => reset(s, http2.constants.NGHTTP2_INTERNAL_ERROR),
  "reset protocol": (s) => reset(s, http2.constants.NGHTTP2_PROTOCOL_ERROR),
  "status internal": (s) => s.end(),
};

let server: http2.Http2Server;
let target: string;

before(async () => {
  server = http2.createServer();
  server.on("stream", (stream) => {
    stream.on("error", () => undefined);
    let body = Buffer.alloc(0);
    stream.on("data", (chunk: Buffer) => (body = Buffer.concat([body, chunk])));
    stream.on("end", () => {
      const prompt = Object.keys(endings).find((p) => body.includes(p)) ?? "";
      const serverStatus = prompt === "status internal";
      stream.respond(
        { ":status": 200, "content-type": "application/grpc" },
        { waitForTrailers: serverStatus },
      );
      if (serverStatus) {
        stream.on("wantTrailers", () =>
          stream.sendTrailers({ "grpc-status": "13", "grpc-message": "an incident id" }),
        );
      }
      // The reply has begun when the stream ends, as when Envoy cuts a Chat stream.
      stream.write(EMPTY_MESSAGE, () => endings[prompt]?.(stream));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  target = `127.0.0.1:${(server.address() as AddressInfo).port}`;
});

after(() => server.close());

async function chatError(prompt: string): Promise<{ error: GlmError; received: number }> {
  const client = connect(target);
  let received = 0;
  try {
    for await (const _ of client.chat({ messages: [{ role: "user", content: prompt }] })) {
      received += 1;
    }
  } catch (error) {
    assert.ok(error instanceof GlmError, String(error));
    return { error, received };
  } finally {
    client.close();
  }
  assert.fail("the stream ended without an error");
}

test("a stream its peer reset with INTERNAL_ERROR is UNAVAILABLE, grpcCode INTERNAL", async () => {
  const { error, received } = await chatError("reset internal");
  assert.equal(received, 1);
  assert.equal(error.code, Code.UNAVAILABLE);
  assert.equal(error.grpcCode, Code.INTERNAL);
  assert.match(error.details, /Received RST_STREAM with code 2\b/);
  assert.equal(error.message, `UNAVAILABLE: ${error.details}`);
});

test("a reset with another HTTP/2 code keeps gRPC's code", async () => {
  const { error } = await chatError("reset protocol");
  assert.equal(error.code, Code.INTERNAL);
  assert.equal(error.grpcCode, Code.INTERNAL);
  assert.match(error.details, /Received RST_STREAM with code 1\b/);
});

test("a server's own INTERNAL status stays INTERNAL", async () => {
  const { error } = await chatError("status internal");
  assert.equal(error.code, Code.INTERNAL);
  assert.equal(error.grpcCode, Code.INTERNAL);
  assert.equal(error.details, "an incident id");
});

test("fromStatus maps only INTERNAL with a peer's reset code 2", () => {
  const cut = GlmError.fromStatus(Code.INTERNAL, "Received RST_STREAM with code 2");
  assert.deepEqual([cut.code, cut.grpcCode], [Code.UNAVAILABLE, Code.INTERNAL]);
  for (const [code, details] of [
    [Code.INTERNAL, "Received RST_STREAM with code 2 triggered by internal client error: x"],
    [Code.INTERNAL, "Received RST_STREAM with code 22"],
    [Code.INTERNAL, "Received RST_STREAM with code 0"],
    [Code.RESOURCE_EXHAUSTED, "Received RST_STREAM with code 11"],
    [Code.UNAVAILABLE, "read ECONNRESET"],
  ] as const) {
    const error = GlmError.fromStatus(code, details);
    assert.deepEqual([error.code, error.grpcCode, error.details], [code, code, details]);
  }
});
