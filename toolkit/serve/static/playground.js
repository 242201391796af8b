// The playground page's entry point: the key, the models, the compare panes and the tabs. Plain ES modules, no
// framework or build step: the page ships inside the Python package and works offline (docs/PLAYGROUND.md).
import { auth, getJSON } from "./api.js";
import { attachments, watchAttachments } from "./attachments.js";
import { $, byTest, status } from "./dom.js";
import { forgetEvals, showEvals } from "./evals.js";
import { Pane } from "./pane.js";
import { forgetRuns, showRuns } from "./runs.js";
import { SettingsError, showSettingsSummary } from "./settings.js";

const MAX_PANES = 4;
const page = { models: [], panes: [] };

// ------------------------------------------------------------------------------------------------ key + models
async function loadModels() {
  try {
    page.models = (await getJSON("/v1/models")).data.map((m) => m.id); // the base first, then the adapters
  } catch (error) {
    if (error.status === 401) {
      $("auth").hidden = false;
      $("auth-error").textContent = auth.key ? error.message : "";
      $("api-key").focus();
    } else {
      status(`Cannot list the models: ${error.message}`);
    }
    return false;
  }
  $("auth").hidden = true;
  status("");
  return true;
}

async function start() {
  if (!(await loadModels())) return;
  if (page.panes.length === 0) {
    addPane(page.models[0]);
    addPane(page.models[1] || page.models[0]);
  } else {
    page.panes.forEach((p) => p.fillModels(page.models));
  }
  forgetRuns(); // listed again with the key
  forgetEvals();
  openTab(document.querySelector('[role="tab"][aria-selected="true"]').id);
}

function useKey() {
  const input = $("api-key");
  auth.key = input.value.trim() || null;
  input.value = ""; // the key lives in `auth` only
  start();
}

// ------------------------------------------------------------------------------------------------ panes
function addPane(model) {
  if (page.panes.length >= MAX_PANES) return;
  const pane = new Pane(page.models, model, updateButtons);
  byTest(pane.root, "remove-pane").addEventListener("click", () => removePane(pane));
  page.panes.push(pane);
  $("panes").append(pane.root);
  updateButtons();
}

function removePane(pane) {
  if (page.panes.length <= 1) return;
  pane.clear();
  pane.root.remove();
  page.panes = page.panes.filter((p) => p !== pane);
  updateButtons();
}

function updateButtons() {
  const busy = page.panes.some((p) => p.busy);
  $("send").disabled = busy || attachments.reading;
  $("stop-all").disabled = !busy;
  $("add-pane").disabled = page.panes.length >= MAX_PANES;
  page.panes.forEach((p, i) => {
    p.number(i + 1);
    byTest(p.root, "remove-pane").disabled = page.panes.length <= 1;
    byTest(p.root, "regenerate").disabled = !p.canRegenerate;
  });
}

function sendAll() {
  const text = $("prompt").value.trim();
  const ready = page.models.length && !page.panes.some((p) => p.busy) && !attachments.reading;
  if (!ready || (!text && attachments.count === 0)) return;
  let settings;
  try {
    settings = page.panes.map((p) => p.settings()); // every pane's settings checked before any pane sends
  } catch (error) {
    if (!(error instanceof SettingsError)) throw error;
    status(error.message);
    return;
  }
  status("");
  const images = attachments.take();
  const content = images.length ? [...(text ? [{ type: "text", text }] : []), ...images] : text;
  page.panes.forEach((pane, i) => pane.send(content, settings[i]));
  $("prompt").value = "";
}

function stopAll() {
  page.panes.forEach((p) => p.stop());
}

// ------------------------------------------------------------------------------------------------ tabs
function openTab(id) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const on = tab.id === id;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !on;
  }
  if (id === "tab-runs") showRuns();
  if (id === "tab-evals") showEvals();
}

function tabKeys(event) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
  if (!step) return;
  const next = tabs[(tabs.indexOf(event.target) + step + tabs.length) % tabs.length];
  next.focus();
  openTab(next.id);
}

// ------------------------------------------------------------------------------------------------ wiring
for (const tab of document.querySelectorAll('[role="tab"]')) {
  tab.addEventListener("click", () => openTab(tab.id));
  tab.addEventListener("keydown", tabKeys);
}
$("api-key-submit").addEventListener("click", useKey);
$("api-key").addEventListener("keydown", (event) => {
  if (event.key === "Enter") useKey();
});
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  sendAll();
});
$("stop-all").addEventListener("click", stopAll);
$("add-pane").addEventListener("click", () => addPane(page.models[0]));
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    sendAll();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") stopAll();
});
for (const input of $("shared-settings").querySelectorAll("[data-field]")) {
  input.addEventListener("input", showSettingsSummary);
  input.addEventListener("change", showSettingsSummary);
}
watchAttachments(updateButtons);
showSettingsSummary();
updateButtons();
start();

