// The radiologist's triage list: polls /api/worklist every 5 s and renders it, most urgent first.
// No framework and no build step: the node serves this file as is and has no internet access.
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "ichnode.apiToken";
const READER_KEY = "ichnode.reader";
const SUBTYPES = ["EDH", "IPH", "IVH", "SAH", "SDH"];
const SUBTYPE_NAMES = {
  any: "any ICH", EDH: "epidural", IPH: "intraparenchymal", IVH: "intraventricular",
  SAH: "subarachnoid", SDH: "subdural",
};
const STATE_LABELS = {
  receiving: "RECEIVING", queued: "QUEUED", analysing: "ANALYSING",
  done: "DONE", failed: "NOT ANALYSED", skipped: "NOT ANALYSED",
};

const $ = (id) => document.getElementById(id);
const thumbnailCache = new Map(); // thumbnail URL + analysed time -> object URL of the fetched PNG

class AuthNeeded extends Error {}

// --- API access; the node may require `Authorization: Bearer <token>` --------------------------
// On 401 the page shows a token form; the token is kept for this browser tab (sessionStorage).

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-form").hidden = false;
    throw new AuthNeeded(token ? "API token rejected, enter the right one" : "API token needed");
  }
  return response;
}

function useToken(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
  refresh();
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `HTTP ${response.status}`;
  }
}

// --- formatting --------------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function patientName(dicomName) {
  if (!dicomName) return "(no name)";
  const [family, given, middle] = dicomName.split("=")[0].split("^");
  return [family, [given, middle].filter(Boolean).join(" ")].filter(Boolean).join(", ");
}

function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "–";
}

function ago(iso) {
  if (!iso) return "";
  const minutes = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 60000));
  if (minutes < 1) return "just now";
  if (minutes < 60) return `${minutes} min ago`;
  if (minutes < 48 * 60) return `${Math.round(minutes / 60)} h ago`;
  return `${Math.round(minutes / 1440)} days ago`;
}

const percent = (p) => `${Math.round(p * 100)}%`;

// --- rendering ---------------------------------------------------------------------------------

function levelBadge(item) {
  if (item.priority) {
    const level = item.priority.level;
    return el("div", `badge badge-${level.toLowerCase()}`, level);
  }
  return el("div", `badge badge-state badge-${item.state || "none"}`, STATE_LABELS[item.state] || "NO SERIES");
}

function patientBlock(item) {
  const block = el("div", "patient");
  block.append(el("div", "patient-name", patientName(item.patient_name)));
  block.append(el("div", "meta", `ID ${item.patient_id || "–"} · Acc ${item.accession_number || "–"}`));
  block.append(el("div", "meta", `Received ${clock(item.timings.received)} (${ago(item.timings.received)})`));
  if (item.state && item.state !== "done") {
    const state = el("div", `state state-${item.state}`, `State: ${item.state}`);
    if (item.reason) state.textContent += ` — ${item.reason}`;
    block.append(state);
  }
  return block;
}

function probabilityRow(label, p, volume) {
  const row = el("tr", p >= 0.5 ? "high" : "");
  row.append(el("th", "", label === "any" ? "Any ICH" : label));
  row.lastChild.title = SUBTYPE_NAMES[label];
  const barCell = el("td", "bar-cell");
  const bar = el("div", "bar");
  const fill = el("div", "bar-fill");
  fill.style.width = percent(p);
  bar.append(fill);
  barCell.append(bar);
  row.append(barCell, el("td", "num", percent(p)), el("td", "num", volume ? `${volume.toFixed(1)} mL` : ""));
  return row;
}

function findingsBlock(item) {
  const block = el("div", "findings");
  if (!item.priority) {
    block.append(el("p", "muted", item.state === "done" ? "No findings." : "No AI result yet."));
    return block;
  }
  const table = el("table", "probabilities");
  table.append(probabilityRow("any", item.probabilities.any ?? 0, item.volumes_ml.any));
  for (const subtype of SUBTYPES) {
    if (subtype in item.probabilities) {
      table.append(probabilityRow(subtype, item.probabilities[subtype], item.volumes_ml[subtype]));
    }
  }
  block.append(table);
  block.append(el("p", "rationale", `${item.priority.rationale} (score ${item.priority.score.toFixed(2)})`));
  if (item.difficult) block.append(el("div", "badge-difficult", "DIFFICULT CASE — read closely"));
  return block;
}

async function thumbnailSource(url, analysed) {
  const key = `${url}#${analysed}`;
  if (!thumbnailCache.has(key)) {
    thumbnailCache.set(key, api(url).then(async (response) => {
      if (!response.ok) throw new Error(await errorText(response));
      return URL.createObjectURL(await response.blob());
    }));
  }
  return thumbnailCache.get(key);
}

function thumbnailsBlock(item) {
  const block = el("div", "thumbnails");
  item.thumbnails.forEach((url, n) => {
    const img = el("img", "thumbnail");
    img.alt = `Heatmap of key slice ${n + 1}`;
    block.append(img);
    thumbnailSource(url, item.timings.analysed).then(
      (src) => { img.src = src; },
      (error) => { img.replaceWith(el("span", "muted", `thumbnail unavailable: ${error.message}`)); },
    );
  });
  return block;
}

function ackBlock(item) {
  const block = el("div", "ack");
  if (item.acknowledged) {
    block.append(el("div", "acknowledged", `✔ Read by ${item.acknowledged.by} at ${clock(item.acknowledged.at)}`));
    return block;
  }
  const button = el("button", "ack-button", "Acknowledge");
  button.type = "button";
  button.addEventListener("click", () => acknowledge(item, button));
  block.append(button);
  return block;
}

function studyRow(item) {
  const level = item.priority ? item.priority.level.toLowerCase() : "pending";
  const row = el("li", `study level-${level}${item.acknowledged ? " is-acknowledged" : ""}`);
  row.dataset.studyUid = item.study_instance_uid;
  row.dataset.level = item.priority ? item.priority.level : "";
  row.append(levelBadge(item), patientBlock(item), findingsBlock(item), thumbnailsBlock(item), ackBlock(item));
  return row;
}

function render(items) {
  $("worklist").replaceChildren(...items.map(studyRow));
  $("empty").hidden = items.length > 0;
  const live = new Set(items.flatMap((i) => i.thumbnails.map((url) => `${url}#${i.timings.analysed}`)));
  for (const [key, source] of thumbnailCache) {
    if (!live.has(key)) {
      thumbnailCache.delete(key);
      source.then(URL.revokeObjectURL, () => {});
    }
  }
}

function setStatus(text, problem = false) {
  $("status").textContent = text;
  $("status").classList.toggle("problem", problem);
}

// --- actions -----------------------------------------------------------------------------------

async function refresh() {
  const query = $("show-acknowledged").checked ? "" : "?include_acknowledged=false";
  try {
    const response = await api(`/api/worklist${query}`);
    if (!response.ok) throw new Error(await errorText(response));
    render(await response.json());
    setStatus(`Updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    const why = error instanceof AuthNeeded ? error.message : `cannot reach the node: ${error.message}`;
    setStatus(`List NOT up to date — ${why}`, true);
  }
}

async function acknowledge(item, button) {
  const reader = $("reader").value.trim();
  if (!reader) {
    setStatus("Enter your name as Reader before acknowledging.", true);
    $("reader").focus();
    return;
  }
  button.disabled = true;
  try {
    const response = await api(`/api/studies/${encodeURIComponent(item.study_instance_uid)}/ack`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ by: reader }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await refresh();
  } catch (error) {
    button.disabled = false;
    setStatus(`Acknowledge failed: ${error.message}`, true);
  }
}

async function poll() {
  await refresh();
  setTimeout(poll, REFRESH_MS);
}

$("reader").value = localStorage.getItem(READER_KEY) || "";
$("reader").addEventListener("change", () => localStorage.setItem(READER_KEY, $("reader").value.trim()));
$("show-acknowledged").addEventListener("change", refresh);
$("token-form").addEventListener("submit", useToken);
poll();
