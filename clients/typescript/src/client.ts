// GlmClient: the idiomatic face of glm.v1.GlmService over any Transport.
import { create, type MessageInitShape } from "@bufbuild/protobuf";

import {
  ChatRequestSchema,
  EmbedRequestSchema,
  GlmService,
  ListModelsRequestSchema,
  TokenizeRequestSchema,
  type ChatResponse,
  type EmbedResponse,
  type ListModelsResponse,
  type TokenizeResponse,
  type Usage,
} from "./gen/glm/v1/glm_service_pb.js";
import type { CallOptions, Transport } from "./transport.js";

/** A ChatRequest as a plain object, e.g. `{ messages: [{ role: "user", content: "Hi" }] }`. */
export type ChatInit = MessageInitShape<typeof ChatRequestSchema>;
/** An EmbedRequest as a plain object, e.g. `{ prompt: ["a", "b"], normalize: true }`. */
export type EmbedInit = MessageInitShape<typeof EmbedRequestSchema>;
/** A TokenizeRequest as a plain object, e.g. `{ prompt: "Hello" }`. */
export type TokenizeInit = MessageInitShape<typeof TokenizeRequestSchema>;

/** A whole chat reply, gathered from the stream. */
export interface ChatText {
  /** The reply's text. */
  text: string;
  /** "stop", "length" or "function_call". */
  finishReason: string;
  /** The token counts of the call. */
  usage: Usage | undefined;
  /** The model that answered. */
  model: string;
}

export class GlmClient {
  constructor(readonly transport: Transport) {}

  /** Streams a chat reply chunk by chunk; `break` or `options.signal` cancels the generation. */
  chat(request: ChatInit, options?: CallOptions): AsyncIterable<ChatResponse> {
    return this.transport.serverStream(
      GlmService.method.chat,
      create(ChatRequestSchema, request),
      options,
    );
  }

  /** Streams a chat reply and returns it whole (the deltas joined). */
  async chatText(request: ChatInit, options?: CallOptions): Promise<ChatText> {
    const reply: ChatText = { text: "", finishReason: "", usage: undefined, model: "" };
    for await (const chunk of this.chat({ ...request, chunk: true }, options)) {
      const choice = chunk.choices[0];
      reply.text += choice?.delta?.content ?? choice?.message?.content ?? "";
      reply.finishReason = choice?.finishReason || reply.finishReason;
      reply.usage = chunk.usage ?? reply.usage;
      reply.model = chunk.model;
    }
    return reply;
  }

  /** Embeds each prompt; `data[i].values` is the vector of `prompt[i]`. */
  embed(request: EmbedInit, options?: CallOptions): Promise<EmbedResponse> {
    return this.transport.unary(GlmService.method.embed, create(EmbedRequestSchema, request), options);
  }

  /** Splits a text into the tokens of a model's tokenizer. */
  tokenize(request: TokenizeInit, options?: CallOptions): Promise<TokenizeResponse> {
    return this.transport.unary(
      GlmService.method.tokenize,
      create(TokenizeRequestSchema, request),
      options,
    );
  }

  /** Lists the configured models with their limits and readiness. */
  listModels(options?: CallOptions): Promise<ListModelsResponse> {
    return this.transport.unary(
      GlmService.method.listModels,
      create(ListModelsRequestSchema),
      options,
    );
  }

  /** Closes the transport. */
  close(): void {
    this.transport.close();
  }
}
