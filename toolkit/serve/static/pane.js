// One compare pane: a model picker, its own conversation, streaming from /v1/chat/completions, and what came back
// (the model id the server answered with, tokens, time to first token, tokens/s, finish reason).
import { headers, httpError, readEvents } from "./api.js";
import { curlOf, pythonOf } from "./code.js";
import { $, byTest, el, fillSelect } from "./dom.js";
import { chatRequest, readFields, sharedSettings } from "./settings.js";

const BLANK = "(a blank answer: left out of the conversation unless regenerated)";

// A data: URL is the user's own file, shown; a web URL is fetched by the server, not by this page (the page loads
// nothing from another origin), so it shows as its address.
export function imageThumb(url, testid) {
  if (url.startsWith("data:")) return el("img", { src: url, alt: "attached image", className: "thumb", testid });
  return el("span", { className: "thumb url", text: `image: ${url}`, title: "fetched by the server", testid });
}

function renderUser(content) {
  const body = el("div", { className: "content" });
  const parts = typeof content === "string" ? [{ type: "text", text: content }] : content;
  for (const part of parts) {
    if (part.type === "text") body.append(el("p", { text: part.text }));
    else body.append(imageThumb(part.image_url.url, "message-image"));
  }
  return el("div", { className: "message user", testid: "message", "data-role": "user" }, el("span", { className: "who", text: "You" }), body);
}

function tokenSpan(entry) {
  const alternatives = (entry.top_logprobs || []).map((t) => `${JSON.stringify(t.token)} ${t.logprob.toFixed(3)}`);
  const title = `${JSON.stringify(entry.token)}: logprob ${entry.logprob.toFixed(3)} (p ${Math.exp(entry.logprob).toFixed(3)})`;
  return el("span", {
    className: "token",
    testid: "token",
    title: alternatives.length ? `${title}\ntop:\n${alternatives.join("\n")}` : title,
    text: entry.token,
  });
}

// The logprobs list the stop token too (as vLLM's do), and a stop string may cut the text inside a token: keep the
// spans that spell the answer's text, or show the plain text where they do not.
function trimTokens(answer, text) {
  let at = 0;
  for (const span of [...answer.children]) {
    if (at >= text.length) span.remove();
    at += span.textContent.length;
  }
  if (answer.textContent !== text) answer.replaceChildren(text);
}

export class Pane {
  // `changed`: called when the pane starts or stops streaming or its turns change (the page's buttons follow)
  constructor(models, model, changed) {
    this.root = $("pane-template").content.firstElementChild.cloneNode(true);
    // One turn per prompt: {content, text, userNode, answerNode}. Only the last may be unanswered (blank, failed or
    // stopped before its first token): Regenerate retries it, the next prompt leaves it out of the conversation.
    this.turns = [];
    this.controller = null;
    this.runs = 0; // Clear and each new run bump it: a superseded run's late events change nothing
    this.lastRequest = null;
    this.changed = changed;
    this.select = byTest(this.root, "model-select");
    this.transcript = byTest(this.root, "transcript");
    this.fillModels(models, model);
    byTest(this.root, "clear").addEventListener("click", () => this.clear());
    byTest(this.root, "regenerate").addEventListener("click", () => this.regenerate());
    byTest(this.root, "copy-curl").addEventListener("click", () => this.copy(curlOf));
    byTest(this.root, "copy-python").addEventListener("click", () => this.copy(pythonOf));
  }

  fillModels(models, preferred) {
    fillSelect(this.select, models, preferred);
  }

  number(n) {
    this.select.setAttribute("aria-label", `Model of pane ${n}`);
    byTest(this.root, "remove-pane").setAttribute("aria-label", `Remove pane ${n}`);
    this.transcript.setAttribute("aria-label", `Conversation in pane ${n}`);
  }

  get busy() {
    return this.controller !== null;
  }

  get canRegenerate() {
    return !this.busy && this.turns.length > 0;
  }

  setState(name) {
    this.root.dataset.state = name;
    this.transcript.setAttribute("aria-busy", String(name === "streaming"));
    this.changed();
  }

  settings() {
    return { ...sharedSettings(), ...readFields(byTest(this.root, "pane-settings")) };
  }

  // The messages to send: every answered turn, then the last turn's prompt.
  conversation() {
    const last = this.turns[this.turns.length - 1];
    const answered = this.turns.slice(0, -1).filter((t) => t.text.trim());
    return [
      ...answered.flatMap((t) => [
        { role: "user", content: t.content },
        { role: "assistant", content: t.text },
      ]),
      { role: "user", content: last.content },
    ];
  }

  send(content, settings) {
    const last = this.turns[this.turns.length - 1];
    if (last && !last.text.trim()) last.userNode.classList.add("left-out");
    const turn = { content, text: "", userNode: renderUser(content), answerNode: null };
    this.turns.push(turn);
    this.transcript.append(turn.userNode);
    this.follow(true);
    return this.run(settings);
  }

  regenerate() {
    if (this.canRegenerate) this.run(this.settings());
  }

  async run(settings) {
    const run = ++this.runs;
    const turn = this.turns[this.turns.length - 1];
    if (turn.answerNode) turn.answerNode.remove();
    turn.text = "";
    const body = chatRequest(this.select.value, this.conversation(), settings);
    this.lastRequest = body;
    for (const id of ["pane-error", "pane-stats"]) byTest(this.root, id).textContent = "";
    byTest(this.root, "pane-model").textContent = "–"; // until this answer names its model
    const answer = this.newAnswer(turn);
    this.controller = new AbortController();
    this.setState("streaming");
    const timing = { start: performance.now(), first: null };
    const result = { text: "", tokens: 0, finish: null, usage: null, logprobs: false };
    let outcome = "done";
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify(body),
        signal: this.controller.signal,
      });
      if (!response.ok) throw await httpError(response);
      await readEvents(response, (chunk) => {
        if (run !== this.runs) throw new DOMException("superseded", "AbortError");
        if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
        if (chunk.model) byTest(this.root, "pane-model").textContent = chunk.model;
        if (chunk.usage) result.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = (choice.delta && choice.delta.content) || "";
          const entries = (choice.logprobs && choice.logprobs.content) || [];
          if ((piece || entries.length) && timing.first === null) timing.first = performance.now();
          result.text += piece;
          result.tokens += entries.length;
          if (entries.length) {
            result.logprobs = true;
            answer.append(...entries.map(tokenSpan));
          } else if (piece) {
            answer.append(piece);
          }
          if (choice.finish_reason) result.finish = choice.finish_reason;
        }
        this.follow();
      });
    } catch (error) {
      outcome = error.name === "AbortError" ? "stopped" : "error";
      if (outcome === "error") byTest(this.root, "pane-error").textContent = error.message;
    }
    if (run !== this.runs) return; // cleared or rerun meanwhile: this run's results belong to nothing
    this.controller = null;
    if (result.logprobs) trimTokens(answer, result.text);
    turn.text = outcome === "error" ? "" : result.text;
    if (!turn.text.trim()) {
      if (outcome === "done") {
        answer.textContent = BLANK;
        answer.classList.add("empty");
      } else {
        turn.answerNode.remove(); // nothing came: the prompt stays, for Regenerate or to be left out
        turn.answerNode = null;
      }
    }
    if (outcome !== "error") this.showStats(result, timing, outcome === "stopped" ? "stopped" : result.finish);
    this.setState(outcome);
  }

  newAnswer(turn) {
    for (const old of this.transcript.querySelectorAll('[data-testid="answer"]')) old.removeAttribute("data-testid");
    const content = el("div", { className: "content", testid: "answer" });
    turn.answerNode = el(
      "div",
      { className: "message assistant", testid: "message", "data-role": "assistant" },
      el("span", { className: "who", text: "Model" }),
      content,
    );
    this.transcript.append(turn.answerNode);
    this.follow(true);
    return content;
  }

  // Keep the newest text in sight inside the pane (not the page) while the reader has not scrolled up.
  follow(always = false) {
    const t = this.transcript;
    if (always || t.scrollHeight - t.scrollTop - t.clientHeight < 48) t.scrollTop = t.scrollHeight;
  }

  showStats(result, timing, finish) {
    const tokens = result.usage ? result.usage.completion_tokens : result.tokens || undefined;
    const end = performance.now();
    const parts = [];
    if (tokens !== undefined) parts.push(`${tokens} tokens`);
    if (timing.first !== null) parts.push(`first token ${Math.round(timing.first - timing.start)} ms`);
    if (tokens > 1 && timing.first !== null && end > timing.first) {
      parts.push(`${((tokens - 1) / ((end - timing.first) / 1000)).toFixed(1)} tokens/s`);
    }
    if (finish) parts.push(`finish: ${finish}`);
    byTest(this.root, "pane-stats").textContent = parts.join(" · ");
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  clear() {
    this.runs++;
    this.stop();
    this.controller = null;
    this.turns = [];
    this.transcript.replaceChildren();
    for (const id of ["pane-error", "pane-stats"]) byTest(this.root, id).textContent = "";
    byTest(this.root, "pane-model").textContent = "–";
    this.setState("idle");
  }

  copy(render) {
    if (!this.lastRequest) return;
    const code = render(this.lastRequest);
    const pre = byTest(this.root, "request-code");
    pre.textContent = code;
    pre.hidden = false;
    if (navigator.clipboard) navigator.clipboard.writeText(code).catch(() => {}); // shown under the pane either way
  }
}
