// Streams a chat reply, then embeds two texts, against a glm-api server.
//
//   node dist/examples/chat.js [--target HOST:PORT] [--api-key KEY] [--tls [--ca FILE]]
//                              [--model ID] [--max-tokens N] [--abort-after N] PROMPT
//
// A failed call prints "error: CODE: message" on stderr and exits with 1.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { Code, GlmError } from "../src/index.js";
import { connect } from "../src/node.js";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    "api-key": { type: "string" },
    tls: { type: "boolean", default: false },
    ca: { type: "string" },
    model: { type: "string", default: "" },
    "max-tokens": { type: "string", default: "32" },
    "abort-after": { type: "string" },
  },
});
const prompt = positionals.join(" ") || "What is the capital of France?";
const tls = values.tls ? { rootCerts: values.ca ? readFileSync(values.ca) : undefined } : false;
const client = connect(values.target, { apiKey: values["api-key"], tls });

async function main(): Promise<void> {
  const abort = new AbortController();
  const abortAfter = values["abort-after"] === undefined ? Infinity : Number(values["abort-after"]);
  let chunks = 0;
  try {
    const stream = client.chat(
      {
        model: values.model,
        messages: [{ role: "user", content: prompt }],
        temperature: 0,
        maxTokens: Number(values["max-tokens"]),
      },
      { signal: abort.signal },
    );
    for await (const chunk of stream) {
      const choice = chunk.choices[0];
      process.stdout.write(choice?.delta?.content ?? "");
      if (choice?.finishReason) console.log(`\nfinish_reason: ${choice.finishReason}`);
      if (chunk.usage) {
        const u = chunk.usage;
        console.log(`usage: prompt=${u.promptTokens} completion=${u.completionTokens} total=${u.totalTokens}`);
      }
      if (++chunks >= abortAfter) abort.abort();
    }
  } catch (err) {
    if (err instanceof GlmError && err.code === Code.CANCELLED && abort.signal.aborted) {
      console.log(`\ncancelled after ${chunks} chunks`);
      return;
    }
    throw err;
  }
  const embedded = await client.embed({ prompt: ["first text", "second text"], normalize: true });
  const [a, b] = embedded.data.map((e) => e.values);
  const cosine = a!.reduce((sum, x, i) => sum + x * b![i]!, 0);
  console.log(`embed: ${embedded.data.length} vectors of ${embedded.dimensions} floats (${embedded.model}), cosine ${cosine.toFixed(4)}`);
}

main()
  .catch((err: unknown) => {
    const message = err instanceof GlmError ? `${err.codeName}: ${err.details}` : String(err);
    console.error(`error: ${message}`);
    process.exitCode = 1;
  })
  .finally(() => client.close());
