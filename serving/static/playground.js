// The playground: one image, up to five caption variants and the model's account fields, scored
// with one request to /predict/variants. Every text that comes from a user or the server goes in
// with textContent, never as HTML. Served with a Content-Security-Policy of its own origin only.
"use strict";

const MAX_VARIANTS = 5;
const GROUP_WORDS = { image: "Image", caption: "Caption wording", sentiment: "Caption mood" };
const IMAGE_REASONS = new Set(["unsupported_format", "empty_file", "corrupt", "truncated", "too_many_pixels",
  "image_not_a_file", "invalid_base64", "body_too_large"]);
const DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

const $ = (id) => document.getElementById(id);
const state = { meta: null, file: null, fields: [], datetime: null, logScale: true };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function words(name) {
  const s = name.replace(/[_-]+/g, " ").trim();
  return s.charAt(0).toUpperCase() + s.slice(1);
}

const likes = (x) => Math.round(x).toLocaleString("en-US");

// --- errors next to the input concerned -----------------------------------------------------

function clearErrors() {
  for (const node of document.querySelectorAll(".error")) {
    node.hidden = true;
    node.textContent = "";
  }
}

function showError(target, reason, detail) {
  const text = Array.isArray(detail) ? detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ")
    : String(detail ?? "");
  target.textContent = reason ? `${reason}: ${text}` : text;
  target.hidden = false;
}

function errorTarget(reason, detail) {
  const text = typeof detail === "string" ? detail : JSON.stringify(detail);
  if (IMAGE_REASONS.has(reason) || (reason === "missing_field" && text.includes("'image'"))) return $("image-error");
  if (reason === "caption_too_long" || text.includes("captions")) return $("captions-error");
  if (reason === "invalid_feature" || reason === "missing_feature") {
    const field = state.fields.find((f) => text.startsWith(`${f.name}:`));
    if (field) return field.error;
  }
  return $("form-error");
}

// --- inputs ---------------------------------------------------------------------------------

function setFile(file) {
  state.file = file || null;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  if (!file) {
    preview.hidden = true;
    preview.removeAttribute("src");
    return;
  }
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
}

function captionInputs() {
  return [...document.querySelectorAll("#captions input")];
}

function renumberCaptions() {
  captionInputs().forEach((input, i) => {
    input.id = `caption-${i + 1}`;
    input.previousElementSibling.setAttribute("for", input.id);
    input.previousElementSibling.textContent = `Variant ${i + 1}`;
    const remove = input.closest("li").querySelector("button");
    remove.setAttribute("aria-label", `Remove variant ${i + 1}`);
    remove.disabled = captionInputs().length === 1;
  });
  $("add-caption").disabled = captionInputs().length >= MAX_VARIANTS;
}

function addCaption(text = "") {
  if (captionInputs().length >= MAX_VARIANTS) return null;
  const input = el("input", { type: "text", name: "captions", autocomplete: "off" });
  input.value = text;
  const remove = el("button", { type: "button", class: "remove", text: "Remove" });
  const li = el("li", { class: "caption-row" }, el("div", {}, el("label"), input), remove);
  remove.addEventListener("click", () => {
    li.remove();
    renumberCaptions();
    captionInputs()[0].focus();
  });
  $("captions").append(li);
  renumberCaptions();
  return input;
}

function fieldFor(spec) {
  const col = spec.column || {};
  const name = col.name;
  const id = `field-${name}`;
  const wrap = el("div", { class: "field" });
  const error = el("p", { class: "error", role: "alert", id: `${id}-error` });
  error.hidden = true;
  const field = { name, kind: col.kind, error };
  wrap.append(el("label", { for: id, text: words(name) }));
  if (col.kind === "numeric") {
    const input = el("input", { type: "number", id, name, step: "any", inputmode: "decimal" });
    if (col.min !== null && col.min !== undefined) input.min = col.min;
    if (col.max !== null && col.max !== undefined) input.max = col.max;
    const lo = col.min ?? "any", hi = col.max ?? "any";
    wrap.append(input, el("p", { class: "hint", text: `from ${lo} to ${hi}; empty if unknown` }));
    field.value = () => input.value.trim();
  } else if (col.kind === "categorical") {
    const select = el("select", { id, name });
    for (const c of spec.categories || []) select.append(el("option", { value: c, text: c }));
    select.append(el("option", { value: "", text: "other" }));
    wrap.append(select);
    field.value = () => select.value;
  } else if (col.kind === "datetime") {
    const date = el("input", { type: "date", id, name: `${name}-date` });
    const time = el("input", { type: "time", id: `${id}-time`, name: `${name}-time`, "aria-label": `${words(name)}, time` });
    const now = new Date();
    date.value = isoDay(now);
    time.value = `${String(now.getHours()).padStart(2, "0")}:00`;
    const zone = col.timezone || col.zone || spec.timezone || "";
    wrap.append(el("div", { class: "when" }, date, time),
      el("p", { class: "hint", text: zone ? `local time in ${zone}` : "local time of the audience" }));
    field.value = () => (date.value && time.value ? `${date.value}T${time.value}` : "");
    state.datetime = state.datetime || field;
  } else {
    const input = el("input", { type: "text", id, name });
    wrap.append(input);
    field.value = () => input.value;
  }
  wrap.append(error);
  return { wrap, field };
}

function isoDay(d) {
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
}

function buildFields(meta) {
  const specs = (meta.model && meta.model.features) || [];
  const box = $("fields");
  for (const spec of specs) {
    const { wrap, field } = fieldFor(spec);
    box.append(wrap);
    state.fields.push(field);
  }
  $("fields-section").hidden = specs.length === 0;
}

// --- scoring --------------------------------------------------------------------------------

function requestBody() {
  const body = new FormData();
  if (state.file) body.append("image", state.file, state.file.name);
  const captions = captionInputs().map((i) => i.value).filter((t) => t.trim() !== "");
  for (const c of captions.length ? captions : [""]) body.append("captions", c);
  for (const f of state.fields) body.append(f.name, f.value());
  if (state.datetime) {  // the coming week, every hour, in the same request
    body.append("grid_start", isoDay(new Date()));
    body.append("grid_days", "7");
  }
  return body;
}

async function score(event) {
  event.preventDefault();
  clearErrors();
  const button = $("score");
  button.disabled = true;
  $("status").textContent = "Scoring…";
  try {
    const response = await fetch("/predict/variants", { method: "POST", body: requestBody() });
    let answer = null;
    try {
      answer = await response.json();
    } catch (_) {
      answer = null;
    }
    if (!response.ok) {
      const reason = answer && answer.reason ? answer.reason : `http_${response.status}`;
      const detail = answer && answer.detail !== undefined ? answer.detail : response.statusText;
      showError(errorTarget(reason, detail), reason, detail);
      $("status").textContent = "Not scored.";
      return;
    }
    render(answer);
    $("status").textContent = `Scored ${answer.variants.length} variant${answer.variants.length > 1 ? "s" : ""}.`;
  } catch (err) {
    showError($("form-error"), "network_error", `the server did not answer (${err.message})`);
    $("status").textContent = "Not scored.";
  } finally {
    button.disabled = false;
  }
}

// --- results --------------------------------------------------------------------------------

function intervalWords(v) {
  if (!v.interval) return "no interval: the model has no calibration";
  return `${Math.round(v.interval.level * 100)}% sure: ${likes(v.interval.low)}–${likes(v.interval.high)} likes`;
}

// Two variants are too close to call when their intervals overlap by more than half the narrower one.
function tooClose(a, b) {
  if (!a.interval || !b.interval) return false;
  const overlap = Math.min(a.interval.high, b.interval.high) - Math.max(a.interval.low, b.interval.low);
  const width = Math.min(a.interval.high - a.interval.low, b.interval.high - b.interval.low);
  return width > 0 && overlap > 0.5 * width;
}

function effectWords(c) {
  if (state.logScale) return `×${Math.exp(c).toFixed(2)}`;  // log1p target: a factor on likes
  return `${c >= 0 ? "+" : "−"}${Math.abs(c).toFixed(2)}`;
}

function bars(contributions, scale) {
  const grid = el("div", { class: "bars", role: "list" });
  for (const [group, c] of Object.entries(contributions || {})) {
    const half = scale > 0 ? (50 * Math.abs(c)) / scale : 0;
    const bar = el("div", { class: `bar ${c >= 0 ? "up" : "down"}` });
    bar.style.width = `${half}%`;
    const word = GROUP_WORDS[group] || words(group);
    const track = el("div", { class: "bar-track", role: "img",
      "aria-label": `${word} ${c >= 0 ? "raises" : "lowers"} the prediction ${effectWords(c)}` }, bar);
    grid.append(el("span", { class: "bar-label", text: word }), track,
      el("span", { class: "bar-value", text: effectWords(c) }));
  }
  return grid;
}

function card(v, rankOf, closeTo, scale) {
  const li = el("li", { class: `card${v.rank === 1 ? " best" : ""}`, "data-index": String(v.index) });
  const head = el("div", { class: "card-head" },
    el("span", { class: "rank", text: v.rank === 1 ? "#1 · best" : `#${v.rank}` }),
    el("span", { class: "muted", text: `variant ${v.index + 1}` }));
  const caption = el("p", { class: `caption-text${v.caption.trim() ? "" : " empty"}`,
    text: v.caption.trim() ? v.caption : "(no caption)" });
  const big = el("p", { class: "likes" }, el("span", { class: "likes-value", text: likes(v.engagement) }), " ",
    el("small", { text: "likes" }));
  li.append(head, caption, big, el("p", { class: "interval", text: intervalWords(v) }));
  if (closeTo.length) {
    li.append(el("p", { class: "close-call", text: `Too close to call with ${closeTo.map((j) => `#${rankOf[j]}`).join(", ")}` }));
  }
  if (v.contributions) li.append(bars(v.contributions, scale));
  return li;
}

function render(answer) {
  const variants = answer.variants;
  const rankOf = Object.fromEntries(variants.map((v) => [v.index, v.rank]));
  // One scale for every card: the largest contribution of any group in any variant.
  const scale = Math.max(0, ...variants.flatMap((v) => Object.values(v.contributions || {}).map(Math.abs)));
  const cards = $("cards");
  cards.replaceChildren();
  for (const i of answer.ranking) {
    const v = variants[i];
    const close = variants.filter((w) => w.index !== v.index && tooClose(v, w))
      .sort((a, b) => a.rank - b.rank).map((w) => w.index);
    cards.append(card(v, rankOf, close, scale));
  }
  $("scale-note").textContent = state.logScale
    ? "Bars: what moved each prediction against an average post, as a factor on likes; one scale for all cards."
    : "Bars: what moved each prediction against an average post; one scale for all cards.";
  $("results").hidden = false;
  renderGrid(answer);
}

function dayName(start, offset) {
  const d = new Date(`${start}T00:00:00`);
  d.setDate(d.getDate() + offset);
  return { name: DAYS[d.getDay()], date: isoDay(d) };
}

function renderGrid(answer) {
  const grid = answer.grid;
  $("best-time").hidden = !grid;
  if (!grid) return;
  // Each cell: the best variant at that hour.
  const best = grid.cells.map((cell) => {
    let k = 0;
    cell.predictions.forEach((p, j) => { if (p.score > cell.predictions[k].score) k = j; });
    return { cell, variant: k, engagement: cell.predictions[k].engagement, score: cell.predictions[k].score };
  });
  const scores = best.map((b) => b.score);
  const lo = Math.min(...scores), hi = Math.max(...scores);
  const top = [...best].sort((a, b) => b.score - a.score).slice(0, 3);
  const table = $("heatmap");
  table.replaceChildren();
  const head = el("tr", {}, el("th", { scope: "col", text: "Day" }));
  for (const h of grid.hours) head.append(el("th", { scope: "col", text: String(h) }));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  for (let d = 0; d < grid.days; d++) {
    const day = dayName(grid.start, d);
    const row = el("tr", {}, el("th", { scope: "row", text: `${day.name.slice(0, 3)} ${day.date.slice(5)}` }));
    for (const b of best.filter((x) => x.cell.day === d)) {
      const t = hi > lo ? (b.score - lo) / (hi - lo) : 1;
      const td = el("td", { text: String(b.variant + 1),
        title: `${day.name} ${String(b.cell.hour).padStart(2, "0")}:00: variant ${b.variant + 1}, ${likes(b.engagement)} likes` });
      td.style.backgroundColor = `hsl(220, 70%, ${92 - 52 * t}%)`;
      if (t > 0.6) td.style.color = "#fff";
      if (top.includes(b)) td.classList.add("top");
      row.append(td);
    }
    body.append(row);
  }
  table.append(body);
  $("best-slots").textContent = "Best times: " + top.map((b) => {
    const day = dayName(grid.start, b.cell.day);
    return `${day.name} ${String(b.cell.hour).padStart(2, "0")}:00 with variant ${b.variant + 1} (about ${likes(b.engagement)} likes)`;
  }).join("; ") + ".";
}

// --- start ----------------------------------------------------------------------------------

function wireImage() {
  const input = $("image-input");
  input.addEventListener("change", () => setFile(input.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    if (e.dataTransfer.files.length) setFile(e.dataTransfer.files[0]);
  });
}

async function start() {
  wireImage();
  $("add-caption").addEventListener("click", () => { const i = addCaption(); if (i) i.focus(); });
  $("score-form").addEventListener("submit", score);
  addCaption();
  addCaption();
  try {
    const response = await fetch("/metadata");
    const meta = await response.json();
    if (!response.ok) {
      showError($("form-error"), meta.reason, meta.detail);
      $("model-info").textContent = "The model is not loaded yet; reload in a moment.";
      return;
    }
    state.meta = meta;
    state.logScale = ((meta.model.target_transform || {}).kind || "log1p") === "log1p";
    $("model-info").textContent = `Model ${meta.model.name} (version ${meta.model.version})`;
    buildFields(meta);
  } catch (err) {
    showError($("form-error"), "network_error", `could not read /metadata (${err.message})`);
  }
}

document.addEventListener("DOMContentLoaded", start);
