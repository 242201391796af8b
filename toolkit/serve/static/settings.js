// Sampling settings: the shared ones (every pane) and a pane's overrides, read from the inputs marked data-field,
// and the chat request they make.
import { $ } from "./dom.js";

export const TOP_LOGPROBS = 5;
const NUMBERS = ["temperature", "top_p", "max_tokens", "seed", "presence_penalty", "frequency_penalty"];

export class SettingsError extends Error {}

function labelOf(input) {
  const label = input.closest("label");
  return (label ? label.textContent : input.dataset.field).trim().split("\n")[0];
}

function valueOf(input) {
  const field = input.dataset.field;
  if (input.type === "checkbox") return input.checked;
  if (input.tagName === "SELECT") return input.value === "" ? undefined : input.value === "on"; // "": shared
  if (NUMBERS.includes(field)) {
    if (input.validity.badInput) throw new SettingsError(`${labelOf(input)}: not a number`);
    if (input.value.trim() === "") return undefined;
    const n = Number(input.value);
    if (!Number.isFinite(n)) throw new SettingsError(`${labelOf(input)}: ${input.value} is not a finite number`);
    return n;
  }
  if (field === "stop") {
    const lines = input.value.split("\n").filter((s) => s !== "");
    return lines.length ? lines : undefined;
  }
  return input.value.trim() ? input.value : undefined; // the system prompt
}

// The fields under `root` that hold a value (an empty pane field means: the shared value).
export function readFields(root) {
  const out = {};
  for (const input of root.querySelectorAll("[data-field]")) {
    const v = valueOf(input);
    if (v !== undefined) out[input.dataset.field] = v;
  }
  return out;
}

export const sharedSettings = () => readFields($("shared-settings"));

export function chatRequest(model, messages, s) {
  const all = s.system ? [{ role: "system", content: s.system }, ...messages] : messages;
  const body = { model, messages: all, stream: true, stream_options: { include_usage: true } };
  for (const name of NUMBERS) if (s[name] !== undefined) body[name] = s[name];
  if (s.stop) body.stop = s.stop;
  if (s.json) body.response_format = { type: "json_object" };
  if (s.logprobs) Object.assign(body, { logprobs: true, top_logprobs: TOP_LOGPROBS });
  return body;
}

export function showSettingsSummary() {
  let s;
  try {
    s = sharedSettings();
  } catch (error) {
    $("settings-summary").textContent = error.message;
    return;
  }
  const parts = [`temperature ${s.temperature ?? "default"}`, `max_tokens ${s.max_tokens ?? "default"}`];
  if (s.seed !== undefined) parts.push(`seed ${s.seed}`);
  if (s.system) parts.push("system prompt");
  if (s.stop) parts.push(`${s.stop.length} stop`);
  if (s.json) parts.push("JSON mode");
  if (s.logprobs) parts.push("logprobs");
  $("settings-summary").textContent = parts.join(" · ");
}
