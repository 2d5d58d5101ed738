// The browser transport: gRPC-Web over fetch (Connect's gRPC-Web protocol), which Envoy's
// grpc_web filter on glm-api's HTTP port turns into native gRPC. Same GlmClient, same messages.
import type {
  DescMessage,
  DescMethodServerStreaming,
  DescMethodUnary,
  MessageShape,
} from "@bufbuild/protobuf";
import { ConnectError, createContextValues, type Transport as ConnectTransport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { GlmClient } from "./client.js";
import { Code, GlmError } from "./errors.js";
import type { CallOptions, Method, Transport } from "./transport.js";

export interface WebTransportOptions {
  /** Sent as "authorization: Bearer KEY" on every call; a function is asked before each call. */
  apiKey?: string | (() => string | undefined);
  /** fetch to use instead of the global one (e.g. one that sets credentials). */
  fetch?: typeof globalThis.fetch;
}

function toGlmError(err: unknown): GlmError {
  if (err instanceof GlmError) return err;
  // Connect's codes are gRPC's codes, by number.
  const e = ConnectError.from(err);
  return GlmError.fromStatus(e.code as number as Code, e.rawMessage, { cause: err });
}

function headers(options: WebTransportOptions, call?: CallOptions): Headers {
  const h = new Headers(call?.headers ?? {});
  const key = typeof options.apiKey === "function" ? options.apiKey() : options.apiKey;
  if (key) h.set("authorization", `Bearer ${key}`);
  return h;
}

async function* once<T>(value: T): AsyncIterable<T> {
  yield value;
}

/** A Transport over gRPC-Web to `baseUrl` (e.g. "http://localhost:8100", or "/" on the page). */
export function createWebTransport(baseUrl: string, options: WebTransportOptions = {}): Transport {
  const web: ConnectTransport = createGrpcWebTransport({
    baseUrl,
    useBinaryFormat: true,
    ...(options.fetch ? { fetch: options.fetch } : {}),
  });

  return {
    async unary<I extends DescMessage, O extends DescMessage>(
      method: Method<I, O>,
      request: MessageShape<I>,
      call?: CallOptions,
    ): Promise<MessageShape<O>> {
      try {
        const response = await web.unary(
          method as DescMethodUnary<I, O>,
          call?.signal,
          call?.timeoutMs,
          headers(options, call),
          request,
          createContextValues(),
        );
        return response.message;
      } catch (err) {
        throw toGlmError(err);
      }
    },

    async *serverStream<I extends DescMessage, O extends DescMessage>(
      method: Method<I, O>,
      request: MessageShape<I>,
      call?: CallOptions,
    ): AsyncGenerator<MessageShape<O>> {
      // Leaving the loop early aborts the fetch, which resets the stream at Envoy and so
      // cancels the call on the server.
      const abort = new AbortController();
      const onAbort = () => abort.abort(call?.signal?.reason);
      if (call?.signal?.aborted) throw new GlmError(Code.CANCELLED, "cancelled by the caller");
      call?.signal?.addEventListener("abort", onAbort, { once: true });
      try {
        const response = await web.stream(
          method as DescMethodServerStreaming<I, O>,
          abort.signal,
          call?.timeoutMs,
          headers(options, call),
          once(request),
          createContextValues(),
        );
        for await (const message of response.message) yield message;
      } catch (err) {
        throw toGlmError(err);
      } finally {
        call?.signal?.removeEventListener("abort", onAbort);
        abort.abort();
      }
    },

    close(): void {
      // fetch keeps no connection of its own to close.
    },
  };
}

/** A GlmClient over gRPC-Web: `connectWeb(location.origin, { apiKey })`. */
export function connectWeb(baseUrl: string, options: WebTransportOptions = {}): GlmClient {
  return new GlmClient(createWebTransport(baseUrl, options));
}
