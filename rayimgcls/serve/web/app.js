// The classify page: images in, POST /v1/classify (multipart), top-k bars out. Every string from the server or
// from a file name reaches the page through textContent, never as HTML. Nothing is fetched but this server.
"use strict";

const root = document.querySelector('meta[name="api-root"]').content;
const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = sessionStorage.getItem("rayimgcls-key") || "";
keyInput.addEventListener("input", () => {
  sessionStorage.setItem("rayimgcls-key", keyInput.value);
  loadModel();
});

let model = null;

function headers() {
  const key = keyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "muted";
}

// The server's errors are {"error": sentence, "code": code[, "index": i]}: show the sentence, naming the file.
async function errorText(response, files = []) {
  try {
    const body = await response.json();
    const file = body.index === undefined ? null : files[body.index];
    const sentence = body.error || response.statusText;
    return file ? `${file.name || "pasted image"}: ${sentence.replace(/^image \d+: /, "")}` : sentence;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

function size(bytes) {
  return bytes >= 1048576 ? `${Math.round(bytes / 1048576)} MB` : `${Math.round(bytes / 1024)} KB`;
}

async function loadModel() {
  const response = await fetch(`${root}/v1/model`, { headers: headers() });
  if (response.status === 401) {
    $("keybox").open = true;
    $("model").textContent = "This server needs an API key: enter it below.";
    model = null;
    return;
  }
  if (!response.ok) {
    $("model").textContent = await errorText(response);
    return;
  }
  model = await response.json();
  $("model").textContent = `${model.name} · ${model.num_classes} classes · ${model.image_size}px` +
    (model.multilabel ? " · multi-label" : "") + ` · version ${model.version.slice(0, 12)}`;
  $("version").textContent = `rayimgcls ${model.rayimgcls}`;
  $("limits").textContent = `Up to ${model.limits.max_images} images and ${size(model.limits.max_body_bytes)} per request; ` +
    model.limits.accepted_formats.join(", ");
}

// "decode;dur=3.1, model;desc="queue + model";dur=41.0, total;dur=45.2" -> {decode: 3.1, model: 41, total: 45.2}
function timings(header) {
  const out = {};
  for (const part of (header || "").split(",")) {
    const name = part.split(";")[0].trim();
    const dur = /dur=([0-9.]+)/.exec(part);
    if (name && dur) out[name] = parseFloat(dur[1]);
  }
  return out;
}

async function classify(files) {
  files = files.filter((f) => f.type.startsWith("image/") || f.type === "");
  if (!files.length) return;
  const form = new FormData();
  files.forEach((f, i) => form.append("file", f, f.name || `pasted-${i}.png`));
  const topK = model ? Math.min(5, model.num_classes) : 5;
  say(`classifying ${files.length} image${files.length > 1 ? "s" : ""}…`);
  let response;
  try {
    response = await fetch(`${root}/v1/classify?top_k=${topK}`, { method: "POST", body: form, headers: headers() });
  } catch (e) {
    say(`The server could not be reached: ${e.message}`, true);
    return;
  }
  if (!response.ok) {
    say(await errorText(response, files), true);
    return;
  }
  const body = await response.json();
  const t = timings(response.headers.get("Server-Timing"));
  say(`${body.results.length} result${body.results.length > 1 ? "s" : ""} from ${body.model} ` +
    `(${body.version.slice(0, 12)}) in ${Math.round(t.total || 0)} ms: decode ${Math.round(t.decode || 0)} ms, ` +
    `queue + model ${Math.round(t.model || 0)} ms`);
  body.results.forEach((result, i) => show(files[i], result));
}

function show(file, result) {
  const card = $("result").content.firstElementChild.cloneNode(true);
  const img = card.querySelector("img");
  img.src = URL.createObjectURL(file);
  img.alt = file.name || "pasted image";
  card.querySelector("h2").textContent = file.name || "pasted image";
  const bars = card.querySelector(".bars");
  const thresholds = model && model.multilabel ? model.thresholds : null;
  for (const entry of result.top_k) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * entry.score).toFixed(1)}%`;
    bar.appendChild(fill);
    if (thresholds) {
      const mark = document.createElement("span");
      mark.className = "threshold";
      mark.title = `threshold ${thresholds[entry.index]}`;
      mark.style.left = `${(100 * thresholds[entry.index]).toFixed(1)}%`;
      bar.appendChild(mark);
      if (entry.score >= thresholds[entry.index]) li.classList.add("above");
    }
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = entry.score.toFixed(3);
    li.append(name, bar, score);
    bars.appendChild(li);
  }
  if (result.labels) {
    card.querySelector(".labels").textContent = result.labels.length ?
      `labels: ${result.labels.join(", ")}` : "no class above its threshold";
  }
  $("results").prepend(card);
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  classify([...e.dataTransfer.files]);
});
$("files").addEventListener("change", (e) => { classify([...e.target.files]); e.target.value = ""; });
document.addEventListener("paste", (e) => {
  classify([...e.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile()));
});

loadModel();
