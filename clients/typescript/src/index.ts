// @glm-api/client: the browser-safe part (messages, client, errors, the Transport interface).
// Node's transport is in "@glm-api/client/node".
export { GlmClient, type ChatInit, type ChatText, type EmbedInit, type TokenizeInit } from "./client.js";
export { Code, GlmError } from "./errors.js";
export type { CallOptions, Method, Transport } from "./transport.js";
export * from "./gen/glm/v1/glm_service_pb.js";
