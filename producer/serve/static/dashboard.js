// The dashboard: polls /dashboard/state and redraws. No framework, no build step, nothing from a CDN.
"use strict";

const REFRESH_MS = 2000;
const GiB = 1024 ** 3;

// An API key, when the server wants one: #key=... in the address, remembered in this browser.
const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
if (fromHash) localStorage.setItem("batchgen-key", fromHash);
const apiKey = localStorage.getItem("batchgen-key");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function duration(s) {
  if (s == null || !isFinite(s)) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}

function num(x, digits = 1) { return x == null || x === "" ? "–" : Number(x).toFixed(digits); }

function fileLink(id, label) {
  if (!id) return "";
  return el("a", { href: `/v1/files/${id}/content`, class: "file-link", "data-file": id }, label);
}

function progressBar(fraction) {
  const pct = Math.round(fraction * 1000) / 10;
  const bar = el("span", { class: "bar", role: "progressbar", "aria-valuenow": String(pct) }, el("div"));
  bar.firstChild.style.width = `${pct}%`;
  return el("span", {}, bar, el("span", { class: "pct" }, `${pct}%`));
}

function sparkline(points, title) {
  const w = 120, h = 28, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  const t = document.createElementNS(ns, "title");
  t.textContent = title;
  svg.append(t);
  const ys = points.map(p => p[1]).filter(v => v != null);
  if (ys.length < 2) return svg;
  const t0 = points[0][0], t1 = points[points.length - 1][0] || t0 + 1;
  const lo = Math.min(...ys, 0), hi = Math.max(...ys, lo + 1e-9);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.filter(p => p[1] != null).map(([t, v]) =>
    `${((t - t0) / Math.max(1, t1 - t0) * (w - 2) + 1).toFixed(1)},${(h - 2 - (v - lo) / (hi - lo) * (h - 4)).toFixed(1)}`
  ).join(" "));
  svg.append(line);
  return svg;
}

function batchRow(b) {
  const c = b.request_counts;
  return el("tr", { class: `batch status-${b.status}`, "data-id": b.id },
    el("td", {}, b.id), el("td", {}, b.model || ""),
    el("td", { class: "status" }, b.status),
    el("td", {}, progressBar(b.progress)),
    el("td", { class: "num" }, `${c.completed + c.failed} / ${c.total}`),
    el("td", { class: "num" }, String(c.failed)),
    el("td", { class: "num" }, num(b.tokens_per_s)),
    el("td", { class: "num" }, duration(b.eta_s)),
    el("td", {}, fileLink(b.output_file_id, "output"), " ", fileLink(b.error_file_id, "errors")));
}

function workerRow(w, fields) {
  const col = name => fields.indexOf(name);
  const series = name => w.history.map(s => [s[0], s[col(name)]]);
  const used = Number(w.vram_used_bytes || 0) / GiB, free = Number(w.vram_free_bytes || 0) / GiB;
  return el("tr", { class: "worker", "data-name": w.name },
    el("td", {}, w.name), el("td", {}, w.model), el("td", {}, w.state),
    el("td", { class: "num" }, `${w.batch_size} / ${w.max_batch_size}`),
    el("td", { class: "num" }, num(w.tokens_per_s)),
    el("td", { class: "num" }, `${used.toFixed(1)} / ${free.toFixed(1)} GiB`),
    el("td", { class: "num" }, num(w.gpu_temperature_c, 0)),
    el("td", {}, sparkline(series("tokens_per_s"), "tok/s"), sparkline(series("batch_size"), "rows in flight"),
      sparkline(series("vram_used_bytes"), "VRAM used"), sparkline(series("gpu_temperature_c"), "GPU °C")));
}

function fill(tableId, rows, emptyText, columns) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: columns, class: "empty" }, emptyText))]));
}

async function refresh() {
  const problem = document.getElementById("problem");
  try {
    const res = await fetch("/dashboard/state", { headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {} });
    if (res.status === 401) throw new Error("this server wants an API key: open /#key=YOUR_KEY once");
    if (!res.ok) throw new Error(`server answered ${res.status}`);
    const state = await res.json();
    fill("batches", state.batches.map(batchRow), "no batches yet", 9);
    fill("workers", state.workers.map(w => workerRow(w, state.history_fields)), "no live workers", 8);
    document.getElementById("updated").textContent = `updated ${new Date(state.now * 1000).toLocaleTimeString()}`;
    problem.hidden = true;
  } catch (err) {
    problem.textContent = String(err.message || err);
    problem.hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

// A plain link cannot send the key: with one, fetch the file with it and hand the browser the result.
document.addEventListener("click", async event => {
  const link = event.target.closest("a.file-link");
  if (!link || !apiKey) return;
  event.preventDefault();
  const res = await fetch(link.href, { headers: { Authorization: `Bearer ${apiKey}` } });
  const url = URL.createObjectURL(await res.blob());
  const save = el("a", { href: url, download: `${link.dataset.file}.jsonl` });
  save.click();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
});

refresh();
