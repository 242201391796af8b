// The playground page: compare panes over /v1/chat/completions, the runs and the eval reports over
// /playground/api. Plain DOM code, no framework or build step: the page ships inside the Python package and must
// work offline. Everything a model or a file says is put in the page with textContent (never innerHTML), so an
// answer holding HTML shows as characters; the server's Content-Security-Policy forbids inline script besides.
"use strict";

const MAX_PANES = 4;
const TOP_LOGPROBS = 5;

const app = {
  key: null, // the API key: this page's memory only (never storage), sent as Bearer
  models: [], // ids from /v1/models: the base first, then adapters
  panes: [],
  attachments: [], // {url, name}: images waiting for the next send
  runs: null,
  evals: null,
};

// ------------------------------------------------------------------------------------------------ helpers
const $ = (id) => document.getElementById(id);
const byTest = (root, id) => root.querySelector(`[data-testid="${id}"]`);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "text") node.textContent = v;
    else if (k === "testid") node.dataset.testid = v;
    else if (k === "className") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (app.key) h.Authorization = `Bearer ${app.key}`;
  return h;
}

async function httpError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    /* not JSON: keep the status line */
  }
  const error = new Error(message);
  error.status = response.status;
  return error;
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers(false) });
  if (!response.ok) throw await httpError(response);
  return response.json();
}

function status(text) {
  $("status").textContent = text || "";
}

function fmt(value, digits = 4) {
  if (typeof value !== "number") return value === undefined || value === null ? "–" : String(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  return abs !== 0 && (abs >= 1e5 || abs < 1e-3) ? value.toExponential(2) : value.toFixed(digits);
}

// ------------------------------------------------------------------------------------------------ auth + models
async function loadModels() {
  let body;
  try {
    body = await getJSON("/v1/models");
  } catch (error) {
    if (error.status === 401) {
      $("auth").hidden = false;
      $("auth-error").textContent = app.key ? error.message : "";
      $("api-key").focus();
      return false;
    }
    status(`Cannot list the models: ${error.message}`);
    return false;
  }
  $("auth").hidden = true;
  app.models = body.data.map((m) => m.id);
  status("");
  return true;
}

async function start() {
  if (!(await loadModels())) return;
  if (app.panes.length === 0) {
    addPane(app.models[0]);
    addPane(app.models[1] || app.models[0]);
  } else {
    app.panes.forEach((p) => p.fillModels());
  }
  app.runs = app.evals = null; // listed again with the key
  const open = document.querySelector('[role="tab"][aria-selected="true"]').id;
  if (open === "tab-runs") showRuns();
  if (open === "tab-evals") showEvals();
}

// ------------------------------------------------------------------------------------------------ settings
function numberOf(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

function sharedSettings() {
  const stop = $("stop").value.split("\n").filter((s) => s !== "");
  return {
    system: $("system-prompt").value,
    temperature: numberOf($("temperature")),
    top_p: numberOf($("top-p")),
    max_tokens: numberOf($("max-tokens")),
    seed: numberOf($("seed")),
    presence_penalty: numberOf($("presence-penalty")),
    frequency_penalty: numberOf($("frequency-penalty")),
    stop: stop.length ? stop : undefined,
    json: $("json-mode").checked,
    logprobs: $("logprobs").checked,
  };
}

function showSettingsSummary() {
  const s = sharedSettings();
  const parts = [`temperature ${s.temperature ?? "default"}`, `max_tokens ${s.max_tokens ?? "default"}`];
  if (s.seed !== undefined) parts.push(`seed ${s.seed}`);
  if (s.system) parts.push("system prompt");
  if (s.stop) parts.push(`${s.stop.length} stop`);
  if (s.json) parts.push("JSON mode");
  if (s.logprobs) parts.push("logprobs");
  $("settings-summary").textContent = parts.join(" · ");
}

// ------------------------------------------------------------------------------------------------ panes
class Pane {
  constructor(model) {
    this.root = $("pane-template").content.firstElementChild.cloneNode(true);
    this.messages = []; // the conversation as sent: {role, content}
    this.controller = null;
    this.lastRequest = null;
    this.select = byTest(this.root, "model-select");
    this.transcript = byTest(this.root, "transcript");
    this.fillModels(model);
    byTest(this.root, "remove-pane").addEventListener("click", () => removePane(this));
    byTest(this.root, "clear").addEventListener("click", () => this.clear());
    byTest(this.root, "regenerate").addEventListener("click", () => this.regenerate());
    byTest(this.root, "copy-curl").addEventListener("click", () => this.copy(curlOf));
    byTest(this.root, "copy-python").addEventListener("click", () => this.copy(pythonOf));
    $("panes").append(this.root);
  }

  fillModels(chosen) {
    const keep = chosen || this.select.value;
    this.select.replaceChildren(...app.models.map((id) => el("option", { value: id, text: id })));
    if (app.models.includes(keep)) this.select.value = keep;
  }

  get busy() {
    return this.controller !== null;
  }

  setState(name) {
    this.root.dataset.state = name;
    updateButtons();
  }

  settings() {
    const out = sharedSettings();
    for (const input of this.root.querySelectorAll("[data-field]")) {
      if (input.value.trim() === "") continue; // empty: the shared value
      out[input.dataset.field] = input.dataset.field === "system" ? input.value : Number(input.value);
    }
    return out;
  }

  request() {
    const s = this.settings();
    const messages = s.system ? [{ role: "system", content: s.system }, ...this.messages] : [...this.messages];
    const body = { model: this.select.value, messages, stream: true, stream_options: { include_usage: true } };
    for (const name of ["temperature", "top_p", "max_tokens", "seed", "presence_penalty", "frequency_penalty"]) {
      if (s[name] !== undefined && !Number.isNaN(s[name])) body[name] = s[name];
    }
    if (s.stop) body.stop = s.stop;
    if (s.json) body.response_format = { type: "json_object" };
    if (s.logprobs) Object.assign(body, { logprobs: true, top_logprobs: TOP_LOGPROBS });
    return body;
  }

  send(content) {
    this.messages.push({ role: "user", content });
    this.transcript.append(renderUser(content));
    this.follow(true);
    return this.run();
  }

  async run() {
    const body = this.request();
    this.lastRequest = body;
    byTest(this.root, "pane-error").textContent = "";
    byTest(this.root, "pane-stats").textContent = "";
    const answer = this.newAnswer();
    this.controller = new AbortController();
    this.setState("streaming");
    const timing = { start: performance.now(), first: null, end: null };
    const result = { text: "", tokens: [], finish: null, usage: null, model: null };
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify(body),
        signal: this.controller.signal,
      });
      if (!response.ok) throw await httpError(response);
      await readEvents(response, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
        if (chunk.model) this.showModel(chunk.model);
        if (chunk.usage) result.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = (choice.delta && choice.delta.content) || "";
          const entries = (choice.logprobs && choice.logprobs.content) || [];
          if ((piece || entries.length) && timing.first === null) timing.first = performance.now();
          result.text += piece;
          if (entries.length) {
            result.tokens.push(...entries);
            answer.append(...entries.map(tokenSpan));
          } else if (piece) {
            answer.append(piece);
          }
          if (choice.finish_reason) result.finish = choice.finish_reason;
        }
        this.follow();
      });
      timing.end = performance.now();
      if (result.tokens.length) trimTokens(answer, result.text);
      if (result.text.trim()) {
        this.messages.push({ role: "assistant", content: result.text });
      } else {
        this.leaveOut(answer); // the API refuses an empty assistant turn: the exchange cannot be sent back
      }
      this.showStats(result, timing);
      this.controller = null;
      this.setState("done");
    } catch (error) {
      this.controller = null;
      if (error.name === "AbortError") {
        if (result.text) this.messages.push({ role: "assistant", content: result.text });
        else this.dropAnswer();
        this.showStats({ ...result, finish: "stopped" }, { ...timing, end: performance.now() });
        this.setState("stopped");
      } else {
        if (!result.text.trim()) {
          this.dropAnswer();
          this.leaveOutLastUser(); // refused: sending it again would break the turns' alternation
        }
        byTest(this.root, "pane-error").textContent = error.message;
        this.setState("error");
      }
    }
  }

  newAnswer() {
    for (const old of this.transcript.querySelectorAll('[data-testid="answer"]')) old.removeAttribute("data-testid");
    const content = el("div", { className: "content", testid: "answer" });
    const message = el("div", { className: "message assistant", testid: "message", "data-role": "assistant" });
    message.append(el("span", { className: "who", text: "Model" }), content);
    this.transcript.append(message);
    this.follow(true);
    return content;
  }

  leaveOut(answer) {
    answer.textContent = "(a blank answer: this exchange is left out of the conversation)";
    answer.classList.add("empty");
    this.leaveOutLastUser();
  }

  leaveOutLastUser() {
    if (this.messages.length && this.messages[this.messages.length - 1].role === "user") this.messages.pop();
    const users = this.transcript.querySelectorAll('[data-role="user"]');
    if (users.length) users[users.length - 1].classList.add("left-out");
  }

  // Keep the newest text in sight inside the pane (not the page) while the reader has not scrolled up.
  follow(always = false) {
    const t = this.transcript;
    if (always || t.scrollHeight - t.scrollTop - t.clientHeight < 48) t.scrollTop = t.scrollHeight;
  }

  dropAnswer() {
    const messages = this.transcript.querySelectorAll('[data-role="assistant"]');
    if (messages.length) messages[messages.length - 1].remove();
    const previous = this.transcript.querySelectorAll('[data-role="assistant"] .content');
    if (previous.length) previous[previous.length - 1].dataset.testid = "answer";
  }

  showModel(id) {
    byTest(this.root, "pane-model").textContent = id;
  }

  showStats(result, timing) {
    const tokens = result.usage ? result.usage.completion_tokens : result.tokens.length || undefined;
    const parts = [];
    if (tokens !== undefined) parts.push(`${tokens} tokens`);
    if (timing.first !== null) parts.push(`first token ${Math.round(timing.first - timing.start)} ms`);
    if (tokens > 1 && timing.first !== null && timing.end > timing.first) {
      parts.push(`${((tokens - 1) / ((timing.end - timing.first) / 1000)).toFixed(1)} tokens/s`);
    }
    if (result.finish) parts.push(`finish: ${result.finish}`);
    byTest(this.root, "pane-stats").textContent = parts.join(" · ");
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  clear() {
    this.stop();
    this.messages = [];
    this.transcript.replaceChildren();
    byTest(this.root, "pane-model").textContent = "–";
    byTest(this.root, "pane-stats").textContent = "";
    byTest(this.root, "pane-error").textContent = "";
    this.setState("idle");
  }

  regenerate() {
    if (this.busy || this.messages.length === 0) return;
    if (this.messages[this.messages.length - 1].role === "assistant") {
      this.messages.pop();
      this.dropAnswer();
    }
    this.run();
  }

  copy(render) {
    if (!this.lastRequest) return;
    const code = render(this.lastRequest);
    const pre = byTest(this.root, "request-code");
    pre.textContent = code;
    pre.hidden = false;
    if (navigator.clipboard) navigator.clipboard.writeText(code).catch(() => {}); // shown either way
  }
}

function tokenSpan(entry) {
  const alternatives = (entry.top_logprobs || [])
    .map((t) => `${JSON.stringify(t.token)} ${t.logprob.toFixed(3)}`)
    .join("\n");
  const p = Math.exp(entry.logprob);
  const title = `${JSON.stringify(entry.token)}: logprob ${entry.logprob.toFixed(3)} (p ${p.toFixed(3)})`;
  return el("span", {
    className: "token",
    testid: "token",
    title: alternatives ? `${title}\ntop:\n${alternatives}` : title,
    text: entry.token,
  });
}

// The logprobs list the stop token too (as vLLM's do), and a stop string may cut the text inside a token: keep
// the spans that spell the answer's text, or show the plain text where they do not.
function trimTokens(answer, text) {
  let at = 0;
  for (const span of [...answer.children]) {
    if (at >= text.length) span.remove();
    at += span.textContent.length;
  }
  if (answer.textContent !== text) answer.replaceChildren(text);
}

function renderUser(content) {
  const body = el("div", { className: "content" });
  const parts = typeof content === "string" ? [{ type: "text", text: content }] : content;
  for (const part of parts) {
    if (part.type === "text") body.append(el("p", { text: part.text }));
    else body.append(imageThumb(part.image_url.url, "message-image"));
  }
  const message = el("div", { className: "message user", testid: "message", "data-role": "user" });
  message.append(el("span", { className: "who", text: "You" }), body);
  return message;
}

// A data: URL is the user's own file, shown; a web URL is fetched by the server, not by this page (the page
// loads nothing from another origin), so it shows as its address.
function imageThumb(url, testid) {
  if (url.startsWith("data:")) return el("img", { src: url, alt: "attached image", className: "thumb", testid });
  return el("span", { className: "thumb url", text: `image: ${url}`, title: "fetched by the server", testid });
}

// Server-sent events over fetch (EventSource cannot POST or send the key). Calls `onChunk` per JSON event.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

function addPane(model) {
  if (app.panes.length >= MAX_PANES) return;
  app.panes.push(new Pane(model));
  updateButtons();
}

function removePane(pane) {
  if (app.panes.length <= 1) return;
  pane.stop();
  pane.root.remove();
  app.panes = app.panes.filter((p) => p !== pane);
  updateButtons();
}

function updateButtons() {
  const busy = app.panes.some((p) => p.busy);
  $("send").disabled = busy;
  $("stop-all").disabled = !busy;
  $("add-pane").disabled = app.panes.length >= MAX_PANES;
  for (const p of app.panes) {
    byTest(p.root, "remove-pane").disabled = app.panes.length <= 1;
    byTest(p.root, "regenerate").disabled = p.busy || p.messages.length === 0;
  }
}

function sendAll() {
  const text = $("prompt").value.trim();
  if ((!text && app.attachments.length === 0) || app.panes.some((p) => p.busy) || app.models.length === 0) return;
  const images = app.attachments.map((a) => ({ type: "image_url", image_url: { url: a.url } }));
  const content = images.length ? [...(text ? [{ type: "text", text }] : []), ...images] : text;
  for (const pane of app.panes) pane.send(content);
  $("prompt").value = "";
  app.attachments = [];
  renderAttachments();
}

function stopAll() {
  for (const pane of app.panes) pane.stop();
}

// ------------------------------------------------------------------------------------------------ images
function attachFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      status(`${file.name} is not an image`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => {
      app.attachments.push({ url: reader.result, name: file.name });
      renderAttachments();
    };
    reader.readAsDataURL(file);
  }
}

function attachURL() {
  const input = $("image-url");
  const url = input.value.trim();
  if (!url) return;
  if (!/^(https?:|data:image\/)/i.test(url)) {
    status("An image URL starts with http://, https:// or data:image/");
    return;
  }
  app.attachments.push({ url, name: url });
  input.value = "";
  renderAttachments();
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren(
    ...app.attachments.map((a, i) => {
      const remove = el("button", {
        type: "button",
        className: "icon",
        testid: "remove-attachment",
        "aria-label": `Remove image ${a.name}`,
        text: "✕",
      });
      remove.addEventListener("click", () => {
        app.attachments.splice(i, 1);
        renderAttachments();
      });
      return el("li", { testid: "attachment" }, imageThumb(a.url), remove);
    }),
  );
}

// ------------------------------------------------------------------------------------------------ copy as code
function curlOf(body) {
  const auth = app.key ? ` \\\n  -H "Authorization: Bearer $TOOLKIT_API_KEY"` : "";
  return (
    `curl -N ${location.origin}/v1/chat/completions \\\n  -H "Content-Type: application/json"${auth} \\\n` +
    `  -d @- <<'JSON'\n${JSON.stringify(body, null, 2)}\nJSON`
  );
}

function pyLiteral(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return `[\n${value.map((v) => inner + pyLiteral(v, inner)).join(",\n")},\n${indent}]`;
  }
  const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pyLiteral(v, inner)}`);
  return items.length ? `{\n${items.join(",\n")},\n${indent}}` : "{}";
}

function pythonOf(body) {
  const args = Object.entries(body)
    .map(([k, v]) => `    ${k}=${pyLiteral(v, "    ")},`)
    .join("\n");
  const key = app.key ? 'os.environ["TOOLKIT_API_KEY"]' : '"unused"';
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=${key})`,
    `stream = client.chat.completions.create(\n${args}\n)`,
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "print()",
  ].join("\n");
}

// ------------------------------------------------------------------------------------------------ charts
const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// One or more series [{name, points: [[x, y]...]}] as lines on shared axes, in an <svg viewBox="0 0 640 260">.
function lineChart(svg, series, xLabel) {
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points);
  svg.dataset.points = String(series.length ? series[0].points.length : 0);
  if (all.length === 0) {
    svg.append(svgEl("text", { x: 320, y: 130, "text-anchor": "middle", class: "axis" }, "no data in metrics.jsonl"));
    return;
  }
  const [W, H, L, R, T, B] = [640, 260, 64, 16, 12, 36];
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) [y0, y1] = [y0 - 1, y1 + 1];
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(
    svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis-line" }),
    svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis-line" }),
  );
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.append(svgEl("text", { x: L - 6, y: py(y) + 4, "text-anchor": "end", class: "axis" }, fmt(y, 3)));
  }
  for (const x of [x0, Math.round((x0 + x1) / 2), x1]) {
    svg.append(svgEl("text", { x: px(x), y: H - B + 16, "text-anchor": "middle", class: "axis" }, fmt(x, 0)));
  }
  svg.append(svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis" }, xLabel));
  series.forEach((s, i) => {
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join("");
    const path = svgEl("path", { d, class: `series series-${i}` });
    path.append(svgEl("title", {}, s.name));
    svg.append(path);
    svg.append(svgEl("text", { x: W - R, y: T + 12 + 14 * i, "text-anchor": "end", class: `legend series-${i}` }, s.name));
  });
}

// ------------------------------------------------------------------------------------------------ runs
async function showRuns() {
  try {
    if (app.runs === null) app.runs = (await getJSON("/playground/api/runs")).runs;
  } catch (error) {
    status(`Cannot list the runs: ${error.message}`);
    return;
  }
  const select = $("run-select");
  const keep = select.value;
  select.replaceChildren(...app.runs.map((r) => el("option", { value: r.name, text: r.name })));
  $("runs-empty").hidden = app.runs.length > 0;
  if (app.runs.some((r) => r.name === keep)) select.value = keep;
  if (select.value) showRun(select.value);
}

function cardRows(run) {
  const c = run.card || {};
  const recipe = c.recipe || {};
  const training = recipe.training || {};
  const lora = recipe.lora || {};
  const data = c.dataset || {};
  const rows = [
    ["Adapter", run.name],
    ["Created", c.created],
    ["Base", c.base && `${c.base.path} (fingerprint ${c.base.fingerprint})`],
    ["Method", training.method || "sft"],
    ["Started from", c.init_adapter && `${c.init_adapter.name || c.init_adapter.path} (${c.init_adapter.method || ""})`],
    ["LoRA", lora.r !== undefined && `r ${lora.r}, alpha ${lora.alpha}, ${(lora.target_modules || []).join(", ")}`],
    ["Training", training.epochs !== undefined && `${training.epochs} epochs, lr ${training.learning_rate}, batch ${training.batch_size}`],
    ["Data", recipe.data && `${recipe.data.train} (sha256 ${data.sha256 || "?"}, ${data.train_rows ?? "?"} train / ${data.eval_rows ?? "?"} held-out rows)`],
  ];
  const m = c.metrics || {};
  if (m.train) rows.push(["Run", `${m.train.steps} steps, ${fmt(m.train.runtime_s, 1)} s, final train loss ${fmt(m.train.train_loss)}`]);
  for (const column of ["base", "reference", "adapter"]) {
    if (!m[column]) continue;
    const shown = Object.entries(m[column]).filter(([k]) => !k.includes("."));
    rows.push([`Held-out: ${column}`, shown.map(([k, v]) => `${k} ${fmt(v)}`).join(", ")]);
  }
  return rows.filter(([, v]) => v);
}

async function showRun(name) {
  const run = app.runs.find((r) => r.name === name);
  if (!run) return;
  $("run-card").replaceChildren(...cardRows(run).flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  $("run-recipe").textContent = JSON.stringify((run.card || {}).recipe || {}, null, 2);
  let rows = [];
  try {
    rows = (await getJSON(`/playground/api/runs/${encodeURIComponent(name)}/metrics`)).rows;
  } catch (error) {
    status(`Cannot read ${name}'s metrics: ${error.message}`);
  }
  const points = (key) => rows.filter((r) => typeof r[key] === "number" && typeof r.step === "number").map((r) => [r.step, r[key]]);
  const loss = [{ name: "train loss", points: points("loss") }];
  if (points("eval_loss").length) loss.push({ name: "held-out loss", points: points("eval_loss") });
  lineChart($("loss-chart"), loss, "step");
  lineChart($("lr-chart"), [{ name: "learning rate", points: points("learning_rate") }], "step");
}

// ------------------------------------------------------------------------------------------------ eval reports
async function showEvals() {
  let listing;
  try {
    if (app.evals === null) app.evals = await getJSON("/playground/api/evals");
    listing = app.evals;
  } catch (error) {
    status(`Cannot list the eval reports: ${error.message}`);
    return;
  }
  const select = $("eval-select");
  const keep = select.value;
  select.replaceChildren(...listing.reports.map((r) => el("option", { value: r.name, text: r.name })));
  const empty = listing.reports.length === 0;
  $("eval-empty").hidden = !empty;
  $("eval-body").hidden = empty;
  $("eval-empty").textContent = empty
    ? `No eval report in ${listing.eval_dir || "(no eval folder)"}: run \`toolkit eval RECIPE\`, or start the server with --eval-dir.`
    : "";
  if (listing.reports.some((r) => r.name === keep)) select.value = keep;
  if (select.value) showEval(select.value);
}

const current = { report: null, answers: [] };

async function showEval(name) {
  const path = `/playground/api/evals/${encodeURIComponent(name)}`;
  try {
    [current.report, current.answers] = await Promise.all([getJSON(path), getJSON(`${path}/answers`).then((b) => b.rows)]);
  } catch (error) {
    status(`Cannot read the report ${name}: ${error.message}`);
    return;
  }
  const r = current.report;
  const data = r.data || {};
  $("eval-about").textContent =
    `${r.recipe || ""} · ${r.created || ""} · ${data.rows ?? "?"} rows of ${data.source || "?"} · ${r.scoring || ""} · ` +
    (r.passed === false ? `FAILED: ${(r.failures || []).join("; ")}` : r.thresholds && r.thresholds.length ? "gates passed" : "no gates");
  metricsTable(r);
  const models = Object.keys(r.metrics || {});
  const wrong = $("wrong-model");
  const keep = wrong.value;
  wrong.replaceChildren(...models.map((m) => el("option", { value: m, text: m })));
  wrong.value = models.includes(keep) ? keep : models.find((m) => m !== "base") || models[0] || "";
  answersTable();
  chartImage(`${path}/chart.png`);
}

function metricsTable(report) {
  const table = $("eval-metrics");
  const models = Object.keys(report.metrics || {});
  const names = [...new Set(models.flatMap((m) => Object.keys(report.metrics[m])))];
  const head = el("tr", {}, el("th", { scope: "col", text: "metric" }), ...models.map((m) => el("th", { scope: "col", text: m })));
  const rows = names.map((n) =>
    el("tr", {}, el("th", { scope: "row", text: n }), ...models.map((m) => el("td", { text: fmt(report.metrics[m][n]) }))),
  );
  table.replaceChildren(el("caption", { text: "Metrics" }), el("thead", {}, head), el("tbody", {}, ...rows));
}

async function chartImage(path) {
  const img = $("eval-chart");
  img.hidden = true;
  const response = await fetch(path, { headers: headers(false) }); // with the key: an <img src> could not send it
  if (!response.ok) return;
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await response.blob());
  img.hidden = false;
}

// A row is wrong for a model when its first exact score is below 1, or, for a preference pair, when the chosen
// answer is not the more likely one.
function isWrong(line) {
  if (typeof line.margin === "number") return line.margin <= 0;
  for (const key of ["exact_match", "contains", "regex"]) if (typeof line[key] === "number") return line[key] < 1;
  return false;
}

function answerText(line) {
  if (typeof line.margin === "number") {
    return `log p chosen ${fmt(line.chosen_logp, 2)} vs rejected ${fmt(line.rejected_logp, 2)} (margin ${fmt(line.margin, 2)})`;
  }
  return line.answer ?? "";
}

function answersTable() {
  const table = $("eval-answers");
  const byRow = new Map();
  for (const line of current.answers) {
    if (!byRow.has(line.row)) byRow.set(line.row, {});
    byRow.get(line.row)[line.model] = line;
  }
  const models = Object.keys(current.report.metrics || {});
  const onlyWrong = $("wrong-only").checked;
  const who = $("wrong-model").value;
  const shown = [...byRow.entries()].filter(([, lines]) => !onlyWrong || (lines[who] && isWrong(lines[who])));
  const head = el(
    "tr",
    {},
    ...["row", "prompt", "reference"].map((t) => el("th", { scope: "col", text: t })),
    ...models.map((m) => el("th", { scope: "col", text: m })),
  );
  const rows = shown.map(([row, lines]) => {
    const any = Object.values(lines)[0] || {};
    const cells = models.map((m) => {
      const line = lines[m];
      const td = el("td", { text: line ? answerText(line) : "–" });
      if (line && isWrong(line)) td.className = "wrong";
      return td;
    });
    const prompt = any.prompt === undefined ? "" : any.prompt + (any.images ? ` [${any.images} image(s)]` : "");
    return el(
      "tr",
      { testid: "answer-row", "data-row": row },
      el("th", { scope: "row", text: row }),
      el("td", { text: prompt }),
      el("td", { text: any.reference ?? "" }),
      ...cells,
    );
  });
  table.replaceChildren(el("caption", { className: "visually-hidden", text: "Answers by row" }), el("thead", {}, head), el("tbody", {}, ...rows));
  $("answers-count").textContent = `${shown.length} of ${byRow.size} rows`;
}

// ------------------------------------------------------------------------------------------------ wiring
function selectTab(id) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const on = tab.id === id;
    tab.setAttribute("aria-selected", String(on));
    $(tab.getAttribute("aria-controls")).hidden = !on;
  }
  if (id === "tab-runs") showRuns();
  if (id === "tab-evals") showEvals();
}

function wire() {
  for (const tab of document.querySelectorAll('[role="tab"]')) tab.addEventListener("click", () => selectTab(tab.id));
  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    app.key = $("api-key").value.trim() || null;
    start();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendAll();
  });
  $("stop-all").addEventListener("click", stopAll);
  $("add-pane").addEventListener("click", () => addPane(app.models[0]));
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      sendAll();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") stopAll();
  });
  $("image-input").addEventListener("change", (event) => {
    attachFiles(event.target.files);
    event.target.value = "";
  });
  $("add-image-url").addEventListener("click", attachURL);
  $("image-url").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      attachURL();
    }
  });
  $("prompt").addEventListener("paste", (event) => {
    const files = [...(event.clipboardData || {}).files || []];
    if (files.length) {
      event.preventDefault();
      attachFiles(files);
    }
  });
  const composer = $("composer");
  composer.addEventListener("dragover", (event) => {
    event.preventDefault();
    composer.classList.add("dropping");
  });
  composer.addEventListener("dragleave", () => composer.classList.remove("dropping"));
  composer.addEventListener("drop", (event) => {
    event.preventDefault();
    composer.classList.remove("dropping");
    attachFiles(event.dataTransfer.files);
  });
  $("run-select").addEventListener("change", (event) => showRun(event.target.value));
  $("eval-select").addEventListener("change", (event) => showEval(event.target.value));
  $("wrong-only").addEventListener("change", answersTable);
  $("wrong-model").addEventListener("change", answersTable);
  for (const input of document.querySelectorAll(".settings input, .settings textarea")) {
    input.addEventListener("input", showSettingsSummary);
    input.addEventListener("change", showSettingsSummary);
  }
  showSettingsSummary();
  updateButtons();
}

document.addEventListener("DOMContentLoaded", () => {
  wire();
  start();
});
// playground: complete
