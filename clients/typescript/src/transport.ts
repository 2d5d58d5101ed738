// The one thing GlmClient needs from the network: a way to make a unary and a server-streaming
// call with typed messages. Node uses @grpc/grpc-js (./node.ts); a browser build supplies a
// gRPC-Web transport with the same shape, so that the client and the messages are shared.
import type { DescMessage, DescMethod, MessageShape } from "@bufbuild/protobuf";

/** Per-call options. */
export interface CallOptions {
  /** Cancels the call: a pending reply rejects, a stream stops, and the server stops working. */
  signal?: AbortSignal;
  /** A deadline for the whole call, in milliseconds from now (DEADLINE_EXCEEDED after it). */
  timeoutMs?: number;
  /** Extra request metadata (lower-case keys). */
  headers?: Record<string, string>;
}

/** A method of a generated service descriptor, with its request and response types. */
export type Method<I extends DescMessage, O extends DescMessage> = DescMethod & {
  input: I;
  output: O;
};

/** Carries calls to a server. Errors are thrown as GlmError. */
export interface Transport {
  /** One request, one response. */
  unary<I extends DescMessage, O extends DescMessage>(
    method: Method<I, O>,
    request: MessageShape<I>,
    options?: CallOptions,
  ): Promise<MessageShape<O>>;
  /** One request, a stream of responses; leaving the loop early cancels the call. */
  serverStream<I extends DescMessage, O extends DescMessage>(
    method: Method<I, O>,
    request: MessageShape<I>,
    options?: CallOptions,
  ): AsyncIterable<MessageShape<O>>;
  /** Closes the connection; calls in flight are cancelled. */
  close(): void;
}
