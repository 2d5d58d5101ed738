// The Node.js transport: native gRPC over HTTP/2 with @grpc/grpc-js, plaintext or TLS, with an
// optional API key sent as "authorization: Bearer KEY" on every call.
import { fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";

import { GlmClient } from "./client.js";
import { Code, GlmError } from "./errors.js";
import type { CallOptions, Method, Transport } from "./transport.js";

/** TLS settings; PEM text or bytes. Without rootCerts the system's roots are trusted. */
export interface TlsOptions {
  /** The certificate authorities to trust instead of the system's. */
  rootCerts?: string | Buffer;
  /** The client's certificate chain, for mutual TLS. */
  certChain?: string | Buffer;
  /** The client's private key, for mutual TLS. */
  privateKey?: string | Buffer;
  /** The name to check the server's certificate against, when it differs from the target's. */
  serverName?: string;
}

export interface NodeTransportOptions {
  /** Sent as "authorization: Bearer KEY" metadata on every call. */
  apiKey?: string;
  /** true for TLS with the system's roots, an object for more; plaintext when absent or false. */
  tls?: boolean | TlsOptions;
  /** Extra grpc-js channel options, e.g. { "grpc.max_receive_message_length": 64 << 20 }. */
  channelOptions?: grpc.ChannelOptions;
}

function bytes(value: string | Buffer | undefined): Buffer | null {
  if (value === undefined) return null;
  return typeof value === "string" ? Buffer.from(value) : value;
}

function credentials(tls: NodeTransportOptions["tls"]): grpc.ChannelCredentials {
  if (!tls) return grpc.credentials.createInsecure();
  const o = tls === true ? {} : tls;
  return grpc.credentials.createSsl(bytes(o.rootCerts), bytes(o.privateKey), bytes(o.certChain));
}

function toGlmError(err: unknown): GlmError {
  if (err instanceof GlmError) return err;
  const e = err as Partial<grpc.ServiceError>;
  if (typeof e.code === "number") {
    return GlmError.fromStatus(e.code as number as Code, e.details ?? String(err), { cause: err });
  }
  return new GlmError(Code.UNKNOWN, String(err), { cause: err });
}

function cancelled(): GlmError {
  return new GlmError(Code.CANCELLED, "cancelled by the caller");
}

/** A Transport over @grpc/grpc-js to `target` ("host:port"). */
export function createNodeTransport(target: string, options: NodeTransportOptions = {}): Transport {
  const channelOptions: grpc.ChannelOptions = { ...options.channelOptions };
  if (typeof options.tls === "object" && options.tls.serverName) {
    channelOptions["grpc.ssl_target_name_override"] = options.tls.serverName;
    channelOptions["grpc.default_authority"] = options.tls.serverName;
  }
  const client = new grpc.Client(target, credentials(options.tls), channelOptions);

  function prepare<I extends DescMessage, O extends DescMessage>(method: Method<I, O>, call?: CallOptions) {
    const metadata = new grpc.Metadata();
    if (options.apiKey) metadata.set("authorization", `Bearer ${options.apiKey}`);
    for (const [key, value] of Object.entries(call?.headers ?? {})) metadata.set(key, value);
    const callOptions: grpc.CallOptions = {};
    if (call?.timeoutMs !== undefined) callOptions.deadline = Date.now() + call.timeoutMs;
    return {
      path: `/${method.parent.typeName}/${method.name}`,
      serialize: (message: MessageShape<I>) => Buffer.from(toBinary(method.input, message)),
      deserialize: (data: Buffer) => fromBinary(method.output, data),
      metadata,
      callOptions,
    };
  }

  return {
    unary<I extends DescMessage, O extends DescMessage>(
      method: Method<I, O>,
      request: MessageShape<I>,
      options?: CallOptions,
    ): Promise<MessageShape<O>> {
      const signal = options?.signal;
      if (signal?.aborted) return Promise.reject(cancelled());
      const p = prepare(method, options);
      return new Promise((resolve, reject) => {
        const onAbort = () => call.cancel();
        const call = client.makeUnaryRequest(
          p.path,
          p.serialize,
          p.deserialize,
          request,
          p.metadata,
          p.callOptions,
          (err, response) => {
            signal?.removeEventListener("abort", onAbort);
            if (err || response === undefined) reject(toGlmError(err ?? "no response"));
            else resolve(response);
          },
        );
        signal?.addEventListener("abort", onAbort, { once: true });
      });
    },

    async *serverStream<I extends DescMessage, O extends DescMessage>(
      method: Method<I, O>,
      request: MessageShape<I>,
      options?: CallOptions,
    ): AsyncGenerator<MessageShape<O>> {
      const signal = options?.signal;
      if (signal?.aborted) throw cancelled();
      const p = prepare(method, options);
      const call = client.makeServerStreamRequest(
        p.path,
        p.serialize,
        p.deserialize,
        request,
        p.metadata,
        p.callOptions,
      );
      const onAbort = () => call.cancel();
      signal?.addEventListener("abort", onAbort, { once: true });
      try {
        for await (const message of call) yield message as MessageShape<O>;
      } catch (err) {
        throw toGlmError(err);
      } finally {
        signal?.removeEventListener("abort", onAbort);
        // A no-op after the stream ended; stops the server's work when the caller left early.
        call.cancel();
      }
    },

    close(): void {
      client.close();
    },
  };
}

/** A GlmClient over a Node transport: `connect("127.0.0.1:50051", { apiKey, tls })`. */
export function connect(target: string, options: NodeTransportOptions = {}): GlmClient {
  return new GlmClient(createNodeTransport(target, options));
}
