// The chat page's script (web/index.html): the TypeScript client over gRPC-Web to the origin that
// served the page. Built into web/app.js by `make web` (esbuild, one bundle, no framework).
import { GlmError, type ChatInit, type Model } from "../src/index.js";
import { connectWeb } from "../src/web.js";

function byId<T extends HTMLElement>(id: string): T {
  const element = document.getElementById(id);
  if (!element) throw new Error(`the page has no #${id}`);
  return element as T;
}

const ui = {
  apiKey: byId<HTMLInputElement>("api-key"),
  refresh: byId<HTMLButtonElement>("refresh"),
  chatModel: byId<HTMLSelectElement>("chat-model"),
  maxTokens: byId<HTMLInputElement>("max-tokens"),
  temperature: byId<HTMLInputElement>("temperature"),
  transcript: byId<HTMLDivElement>("transcript"),
  form: byId<HTMLFormElement>("chat-form"),
  prompt: byId<HTMLTextAreaElement>("prompt"),
  send: byId<HTMLButtonElement>("send"),
  stop: byId<HTMLButtonElement>("stop"),
  clear: byId<HTMLButtonElement>("clear"),
  status: byId<HTMLDivElement>("status"),
  embedModel: byId<HTMLSelectElement>("embed-model"),
  textA: byId<HTMLTextAreaElement>("text-a"),
  textB: byId<HTMLTextAreaElement>("text-b"),
  compare: byId<HTMLButtonElement>("compare"),
  similarity: byId<HTMLDivElement>("similarity"),
};

// The key lives in this tab only (sessionStorage), so a reload keeps it and closing forgets it.
const KEY_ITEM = "glm-api-key";
ui.apiKey.value = sessionStorage.getItem(KEY_ITEM) ?? "";
ui.apiKey.addEventListener("change", () => {
  sessionStorage.setItem(KEY_ITEM, ui.apiKey.value.trim());
  void loadModels();
});

const client = connectWeb(location.origin, { apiKey: () => ui.apiKey.value.trim() || undefined });

function describe(err: unknown): string {
  return err instanceof GlmError ? `${err.codeName}: ${err.details}` : String(err);
}

function setStatus(target: HTMLElement, text: string, isError = false): void {
  target.textContent = text;
  target.classList.toggle("error", isError);
}

function fillSelect(select: HTMLSelectElement, models: Model[]): void {
  const previous = select.value;
  select.replaceChildren(
    ...models.map((m) => {
      const option = new Option(m.ready ? m.id : `${m.id} (loading)`, m.id);
      option.selected = m.id === previous || (!previous && m.default);
      return option;
    }),
  );
}

async function loadModels(): Promise<void> {
  try {
    const { data } = await client.listModels();
    // A model's object type says its kind, also while it loads.
    fillSelect(ui.chatModel, data.filter((m) => m.object !== "embedding"));
    fillSelect(ui.embedModel, data.filter((m) => m.object === "embedding"));
    setStatus(ui.status, `${data.length} models`);
  } catch (err) {
    setStatus(ui.status, `could not list the models: ${describe(err)}`, true);
  }
}

// The conversation so far, sent whole with every turn (the server keeps no sessions).
let history: NonNullable<ChatInit["messages"]> = [];
let running: AbortController | null = null;

function appendMessage(role: "user" | "assistant", text: string): HTMLDivElement {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  ui.transcript.append(div);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  return div;
}

function rate(tokens: number, seconds: number): string {
  return seconds > 0 ? `${(tokens / seconds).toFixed(1)} tokens/s` : "";
}

async function send(): Promise<void> {
  const text = ui.prompt.value.trim();
  if (!text || running) return;
  ui.prompt.value = "";
  appendMessage("user", text);
  const turn = [...history, { role: "user", content: text }];
  const reply = appendMessage("assistant", "");
  const abort = new AbortController();
  running = abort;
  ui.send.disabled = true;
  ui.stop.disabled = false;
  ui.transcript.dataset["state"] = "streaming";
  setStatus(ui.status, "waiting for the first token…");

  const started = performance.now();
  let firstAt = 0;
  let chunks = 0;
  let outcome = "";
  let failed = false;
  try {
    const stream = client.chat(
      {
        model: ui.chatModel.value,
        messages: turn,
        maxTokens: Number(ui.maxTokens.value) || undefined,
        temperature: Number(ui.temperature.value),
        chunk: true,
      },
      { signal: abort.signal },
    );
    for await (const response of stream) {
      const choice = response.choices[0];
      const delta = choice?.delta?.content ?? "";
      if (delta) {
        if (!firstAt) firstAt = performance.now();
        chunks += 1;
        reply.textContent += delta;
        ui.transcript.scrollTop = ui.transcript.scrollHeight;
        // Tokens after the first over the time after the first: the decode speed.
        const decoding = (performance.now() - firstAt) / 1000;
        setStatus(ui.status, `${chunks} tokens · ${rate(chunks - 1, decoding)}`);
      }
      if (response.usage) {
        const tokens = response.usage.completionTokens;
        const seconds = (performance.now() - (firstAt || started)) / 1000;
        outcome = `${tokens} tokens · ${rate(Math.max(tokens - 1, 0), seconds)} · ${
          choice?.finishReason || "done"
        } · first token after ${((firstAt - started) / 1000).toFixed(2)} s`;
      }
    }
    history = [...turn, { role: "assistant", content: reply.textContent ?? "" }];
  } catch (err) {
    if (abort.signal.aborted) {
      outcome = `stopped after ${chunks} tokens`;
      // The partial reply stays in the conversation: the next turn continues from it.
      history = [...turn, { role: "assistant", content: reply.textContent ?? "" }];
    } else {
      outcome = describe(err);
      failed = true;
    }
  } finally {
    running = null;
    ui.send.disabled = false;
    ui.stop.disabled = true;
    ui.transcript.dataset["state"] = abort.signal.aborted ? "stopped" : failed ? "failed" : "done";
  }
  setStatus(ui.status, outcome, failed);
}

function cosine(a: number[], b: number[]): number {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i++) {
    const x = a[i] ?? 0;
    const y = b[i] ?? 0;
    dot += x * y;
    na += x * x;
    nb += y * y;
  }
  return dot / Math.sqrt(na * nb);
}

async function compare(): Promise<void> {
  const texts = [ui.textA.value, ui.textB.value];
  if (texts.some((t) => !t.trim())) {
    setStatus(ui.similarity, "type two texts", true);
    return;
  }
  ui.compare.disabled = true;
  setStatus(ui.similarity, "embedding…");
  try {
    const response = await client.embed({ model: ui.embedModel.value, prompt: texts });
    const [a, b] = response.data.map((e) => e.values);
    if (!a || !b) throw new Error("the server returned fewer than two vectors");
    setStatus(
      ui.similarity,
      `cosine similarity ${cosine(a, b).toFixed(4)} (${response.model}, ${response.dimensions} dimensions)`,
    );
  } catch (err) {
    setStatus(ui.similarity, describe(err), true);
  } finally {
    ui.compare.disabled = false;
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  void send();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    void send();
  }
});
ui.stop.addEventListener("click", () => running?.abort());
ui.clear.addEventListener("click", () => {
  running?.abort();
  history = [];
  ui.transcript.replaceChildren();
  setStatus(ui.status, "");
});
ui.refresh.addEventListener("click", () => void loadModels());
ui.compare.addEventListener("click", () => void compare());
void loadModels();
