// DOM helpers shared by the views. Text always goes in through textContent (never innerHTML): an answer, a dataset
// row or a report field holding HTML shows as characters.

export const $ = (id) => document.getElementById(id);
export const byTest = (root, id) => root.querySelector(`[data-testid="${id}"]`);

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "text") node.textContent = v;
    else if (k === "testid") node.dataset.testid = v;
    else if (k === "className") node.className = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

// A <select>'s options replaced by `values`, keeping the current choice (or `preferred`) where it is still offered.
export function fillSelect(select, values, preferred) {
  const keep = [select.value, preferred].find((v) => v && values.includes(v));
  select.replaceChildren(...values.map((v) => el("option", { value: v, text: v })));
  if (keep) select.value = keep;
  return select.value;
}

export function status(text) {
  $("status").textContent = text || "";
}

export function fmt(value, digits = 4) {
  if (typeof value !== "number") return value === undefined || value === null ? "–" : String(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  return abs !== 0 && (abs >= 1e5 || abs < 1e-3) ? value.toExponential(2) : value.toFixed(digits);
}

// Each call supersedes the previous one: `latest()` tells a slow response whether a newer choice replaced it.
export function sequence() {
  let current = 0;
  return () => {
    const mine = ++current;
    return () => mine === current;
  };
}
