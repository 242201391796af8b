// The Runs view: each served adapter's card (toolkit.json) and its loss and learning-rate curves (metrics.jsonl).
import { getJSON } from "./api.js";
import { lineChart } from "./charts.js";
import { $, el, fillSelect, fmt, sequence, status } from "./dom.js";

let runs = null; // listed once per key
const latest = sequence();

export function forgetRuns() {
  runs = null;
}

export async function showRuns() {
  try {
    if (runs === null) runs = (await getJSON("/playground/api/runs")).runs;
  } catch (error) {
    status(`Cannot list the runs: ${error.message}`);
    return;
  }
  const chosen = fillSelect($("run-select"), runs.map((r) => r.name));
  $("runs-empty").hidden = runs.length > 0;
  if (chosen) showRun(chosen);
}

function cardRows(run) {
  const c = run.card || {};
  const recipe = c.recipe || {};
  const training = recipe.training || {};
  const lora = recipe.lora || {};
  const data = c.dataset || {};
  const start = c.init_adapter;
  const rows = [
    ["Adapter", run.name],
    ["Created", c.created],
    ["Base", c.base && `${c.base.path} (fingerprint ${c.base.fingerprint})`],
    ["Method", training.method || "sft"],
    ["Started from", start && `${start.name || start.path} (${start.method || "?"})`],
    ["LoRA", lora.r !== undefined && `r ${lora.r}, alpha ${lora.alpha}, ${(lora.target_modules || []).join(", ")}`],
    ["Training", training.epochs !== undefined && `${training.epochs} epochs, lr ${training.learning_rate}, batch ${training.batch_size}`],
    ["Data", recipe.data && `${recipe.data.train} (sha256 ${data.sha256 || "?"}, ${data.train_rows ?? "?"} train / ${data.eval_rows ?? "?"} held-out rows)`],
  ];
  const m = c.metrics || {};
  if (m.train) rows.push(["Run", `${m.train.steps} steps, ${fmt(m.train.runtime_s, 1)} s, final train loss ${fmt(m.train.train_loss)}`]);
  for (const column of ["base", "reference", "adapter"]) {
    if (!m[column]) continue;
    const overall = Object.entries(m[column]).filter(([k]) => !k.includes(".")); // not the .text / .image groups
    rows.push([`Held-out: ${column}`, overall.map(([k, v]) => `${k} ${fmt(v)}`).join(", ")]);
  }
  return rows.filter(([, v]) => v);
}

async function showRun(name) {
  const run = runs.find((r) => r.name === name);
  if (!run) return;
  const current = latest();
  $("run-card").replaceChildren(...cardRows(run).flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  $("run-recipe").textContent = JSON.stringify((run.card || {}).recipe || {}, null, 2);
  let rows = [];
  try {
    rows = (await getJSON(`/playground/api/runs/${encodeURIComponent(name)}/metrics`)).rows;
  } catch (error) {
    status(`Cannot read ${name}'s metrics: ${error.message}`);
  }
  if (!current()) return; // another run was chosen meanwhile
  const points = (key) =>
    rows.filter((r) => typeof r[key] === "number" && typeof r.step === "number").map((r) => [r.step, r[key]]);
  const loss = [{ name: "train loss", points: points("loss") }];
  if (points("eval_loss").length) loss.push({ name: "held-out loss", points: points("eval_loss") });
  // GRPO's loss hovers near 0 by construction (advantages are centred): its learning shows in the mean reward
  if (points("reward").length) loss.push({ name: "mean reward", points: points("reward") });
  lineChart($("loss-chart"), loss, "step");
  lineChart($("lr-chart"), [{ name: "learning rate", points: points("learning_rate") }], "step");
}

$("run-select").addEventListener("change", (event) => showRun(event.target.value));
