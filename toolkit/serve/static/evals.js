// The Eval reports view: `toolkit eval`'s reports under --eval-dir: metrics per model, the chart, and answers.jsonl
// as one row per eval row with each model's answer, filtered to the rows a model got wrong.
import { getBlob, getJSON } from "./api.js";
import { $, el, fillSelect, fmt, sequence, status } from "./dom.js";

let listing = null; // listed once per key
const shown = { report: null, answers: [], truncated: false };
const latest = sequence();

export function forgetEvals() {
  listing = null;
}

export async function showEvals() {
  try {
    if (listing === null) listing = await getJSON("/playground/api/evals");
  } catch (error) {
    status(`Cannot list the eval reports: ${error.message}`);
    return;
  }
  const empty = listing.reports.length === 0;
  $("eval-empty").hidden = !empty;
  $("eval-body").hidden = empty;
  $("eval-empty").textContent = empty
    ? `No eval report in ${listing.eval_dir || "(no eval folder)"}: run \`toolkit eval RECIPE\`, or start the server with --eval-dir.`
    : "";
  const chosen = fillSelect($("eval-select"), listing.reports.map((r) => r.name));
  if (chosen) showEval(chosen);
}

async function showEval(name) {
  const current = latest();
  const path = `/playground/api/evals/${encodeURIComponent(name)}`;
  let report, answers, chart;
  try {
    [report, answers] = await Promise.all([getJSON(path), getJSON(`${path}/answers`)]);
    chart = await getBlob(`${path}/chart.png`).catch(() => null); // a report may have no chart
  } catch (error) {
    if (current()) status(`Cannot read the report ${name}: ${error.message}`);
    return;
  }
  if (!current()) return; // another report was chosen meanwhile
  Object.assign(shown, { report, answers: answers.rows, truncated: answers.truncated });
  const data = report.data || {};
  const gates = report.passed === false ? `FAILED: ${(report.failures || []).join("; ")}` : report.thresholds?.length ? "gates passed" : "no gates";
  $("eval-about").textContent =
    `${report.recipe || ""} · ${report.created || ""} · ${data.rows ?? "?"} rows of ${data.source || "?"} · ${report.scoring || ""} · ${gates}`;
  metricsTable(report);
  const models = Object.keys(report.metrics || {});
  fillSelect($("wrong-model"), models, models.find((m) => m !== "base"));
  answersTable();
  const img = $("eval-chart");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.hidden = chart === null;
  if (chart === null) img.removeAttribute("src");
  else img.src = URL.createObjectURL(chart); // fetched with the key: an <img src> could not send it
}

function metricsTable(report) {
  const models = Object.keys(report.metrics || {});
  const names = [...new Set(models.flatMap((m) => Object.keys(report.metrics[m])))];
  const head = el("tr", {}, el("th", { scope: "col", text: "metric" }), ...models.map((m) => el("th", { scope: "col", text: m })));
  const rows = names.map((n) =>
    el("tr", {}, el("th", { scope: "row", text: n }), ...models.map((m) => el("td", { text: fmt(report.metrics[m][n]) }))),
  );
  $("eval-metrics").replaceChildren(el("caption", { text: "Metrics" }), el("thead", {}, head), el("tbody", {}, ...rows));
}

// A row is wrong for a model when its first exact score is below 1, or, for a preference pair, when the chosen
// answer is not the likelier one.
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
  if (shown.report === null) return;
  const byRow = new Map();
  for (const line of shown.answers) {
    if (!byRow.has(line.row)) byRow.set(line.row, {});
    byRow.get(line.row)[line.model] = line;
  }
  const models = Object.keys(shown.report.metrics || {});
  const onlyWrong = $("wrong-only").checked;
  const who = $("wrong-model").value;
  const kept = [...byRow.entries()].filter(([, lines]) => !onlyWrong || (lines[who] && isWrong(lines[who])));
  const head = el(
    "tr",
    {},
    ...["row", "prompt", "reference", ...models].map((t) => el("th", { scope: "col", text: t })),
  );
  const rows = kept.map(([row, lines]) => {
    const any = Object.values(lines)[0] || {};
    const cells = models.map((m) => {
      const line = lines[m];
      return el("td", { text: line ? answerText(line) : "–", className: line && isWrong(line) ? "wrong" : null });
    });
    const prompt = (any.prompt ?? "") + (any.images ? ` [${any.images} image(s)]` : "");
    return el(
      "tr",
      { testid: "answer-row", "data-row": row },
      el("th", { scope: "row", text: row }),
      el("td", { text: prompt }),
      el("td", { text: any.reference ?? "" }),
      ...cells,
    );
  });
  $("eval-answers").replaceChildren(
    el("caption", { className: "visually-hidden", text: "Answers by row" }),
    el("thead", {}, head),
    el("tbody", {}, ...rows),
  );
  const cut = shown.truncated ? " (answers.jsonl was cut at the server's limit)" : "";
  $("answers-count").textContent = `${kept.length} of ${byRow.size} rows${cut}`;
}

$("eval-select").addEventListener("change", (event) => showEval(event.target.value));
$("wrong-only").addEventListener("change", answersTable);
$("wrong-model").addEventListener("change", answersTable);
