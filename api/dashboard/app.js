// FineGates dashboard: one static page over the public /v1 API (see api/routes/dashboard.py).
// The API key lives in sessionStorage only, travels as a bearer header, and is never put in
// a URL or written to the console. Charts and heat-maps are plotly.js (served locally).
"use strict";

const KEY = "finegates.api_key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2000;
const $ = (sel, root = document) => root.querySelector(sel);

// ------------------------------------------------------------------ API access
class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    let msg = err.message || `The server answered ${status}`;
    if (err.line != null && !/line \d/.test(msg)) msg += ` (line ${err.line})`;
    super(msg);
    this.status = status;
    this.line = err.line;
    this.param = err.param;
  }
}

async function api(method, path, { json, form, raw } = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}` };
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form) body = form;
  let resp;
  try {
    resp = await fetch(path, { method, headers, body });
  } catch (e) {
    throw new ApiError(0, { error: { message: "The FineGates server cannot be reached; is it running?" } });
  }
  if (resp.status === 401 && sessionStorage.getItem(KEY)) {
    signOut("Your API key was not accepted (revoked or wrong); sign in again.");
  }
  if (!resp.ok) {
    let b = null;
    try { b = await resp.json(); } catch (e) { /* not JSON */ }
    throw new ApiError(resp.status, b);
  }
  if (raw) return resp;
  return resp.json();
}

// ------------------------------------------------------------------ helpers
function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid == null || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const fmtTime = (s) => (s ? new Date(s * 1000).toLocaleString() : "—");
const pct = (x) => (x == null ? "—" : `${(100 * x).toFixed(1)}%`);
function fmtEta(s) {
  if (s == null) return "";
  if (s < 60) return `${s}s left`;
  if (s < 3600) return `${Math.round(s / 60)} min left`;
  return `${(s / 3600).toFixed(1)} h left`;
}
function fmtBytes(n) {
  if (n == null) return "—";
  const u = ["B", "KB", "MB", "GB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
const fmtInt = (n) => (n == null ? "—" : Number(n).toLocaleString());
function badge(status) { return h("span", { class: `badge ${status}` }, status.replace("_", " ")); }
function progressBar(job) {
  const p = job.progress || {};
  const percent = p.percent == null ? 0 : p.percent;
  const label = p.total_steps ? `step ${p.step}/${p.total_steps}` : (job.status === "queued" ? "waiting" : "");
  return h("div", { class: "progress" },
    h("div", { class: "bar", title: `${percent}%` }, h("span", { style: `width:${percent}%` })),
    h("div", { class: "muted" }, label, job.status === "running" && p.eta_seconds != null ? ` · ${fmtEta(p.eta_seconds)}` : ""));
}
function showError(el, err) {
  el.hidden = false;
  el.textContent = err instanceof Error ? err.message : String(err);
}
const plotReady = () => typeof window.Plotly !== "undefined";
const PLOT_CFG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
function plot(el, data, layout) {
  if (!plotReady()) { el.textContent = "The charting library did not load."; return; }
  // react() redraws only what changed; the revision tells it that the arrays grew
  el._rev = (el._rev || 0) + 1;
  window.Plotly.react(el, data, Object.assign({
    margin: { l: 50, r: 16, t: 30, b: 70 }, legend: { orientation: "h", y: -0.3 },
    font: { size: 11 }, datarevision: el._rev,
  }, layout), PLOT_CFG);
}

// ------------------------------------------------------------------ sign-in & routing
let current = null; // the view's stop() function

function signOut(message) {
  sessionStorage.removeItem(KEY);
  if (current) { current(); current = null; }
  $("#view").hidden = true; $("#nav").hidden = true; $("#signin").hidden = false;
  const err = $("#signin-error");
  if (message) showError(err, message); else err.hidden = true;
}

async function signIn(ev) {
  ev.preventDefault();
  const input = $("#api_key");
  const key = input.value.trim();
  const err = $("#signin-error");
  err.hidden = true;
  if (!key) { showError(err, "Enter an API key."); return; }
  sessionStorage.setItem(KEY, key);
  try {
    await api("GET", "/v1/models");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    showError(err, e.status === 401 ? "This API key was not accepted. Check it and try again." : e);
    return;
  }
  input.value = "";
  if (!location.hash || location.hash === "#/") location.hash = "#/jobs"; // hashchange routes
  else route();
}

function route() {
  if (!sessionStorage.getItem(KEY)) { signOut(); return; }
  if (current) { current(); current = null; }
  $("#signin").hidden = true; $("#nav").hidden = false;
  const view = $("#view"); view.hidden = false; view.replaceChildren();
  const hash = location.hash || "#/jobs";
  let m;
  let name = "jobs";
  if ((m = hash.match(/^#\/jobs\/([\w-]+)$/))) { name = "job"; current = jobView(view, m[1]); }
  else if (hash === "#/new") { name = "new"; current = newJobView(view); }
  else current = jobsView(view);
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === name || (name === "job" && a.dataset.nav === "jobs")));
}

// A poller that runs fn now and then every ms until stopped; errors show in errEl.
function poller(fn, ms, errEl) {
  let timer = null; let stopped = false;
  const tick = async () => {
    if (stopped) return;
    let again = true;
    try { again = (await fn()) !== false; if (errEl) errEl.hidden = true; } catch (e) { if (errEl) showError(errEl, e); }
    if (!stopped && again) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

// ------------------------------------------------------------------ jobs list
function jobsView(root) {
  const err = h("p", { class: "error", role: "alert", hidden: true });
  const body = h("tbody");
  const empty = h("p", { class: "empty", hidden: true },
    "No fine-tuning jobs yet. Upload a dataset and start one under ", h("a", { href: "#/new" }, "New job"), ".");
  const count = h("span", { class: "muted" });
  root.append(h("div", { class: "card" },
    h("div", { class: "row" }, h("h1", {}, "Fine-tuning jobs ", count),
      h("div", { style: "flex:0" }, h("a", { href: "#/new" }, h("button", { type: "button" }, "New job")))),
    err,
    h("table", { id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["Job", "Model", "Status", "Progress", "Sparsity target / measured", "Queue", "Created", "Finished"].map((t) => h("th", {}, t)))),
      body),
    empty));
  return poller(async () => {
    const page = await api("GET", "/v1/fine_tuning/jobs?limit=100");
    count.textContent = page.count != null ? `(${page.count})` : "";
    empty.hidden = page.data.length > 0;
    body.replaceChildren(...page.data.map((j) => h("tr", { "data-job": j.id },
      h("td", {}, h("a", { href: `#/jobs/${j.id}` }, h("code", {}, j.id)), j.suffix ? h("div", { class: "muted" }, j.suffix) : null),
      h("td", {}, j.model, h("div", { class: "muted" }, j.task || "")),
      h("td", {}, badge(j.status), j.error ? h("div", { class: "error" }, j.error.message) : null),
      h("td", {}, progressBar(j)),
      h("td", {}, `${pct(j.sparsity && j.sparsity.target)} / ${pct(j.sparsity && j.sparsity.measured)}`),
      h("td", {}, j.queue_position != null ? `#${j.queue_position}` : "—"),
      h("td", {}, fmtTime(j.created_at)),
      h("td", {}, fmtTime(j.finished_at)))));
  }, 3000, err);
}

// ------------------------------------------------------------------ job page
function series(name, extra = {}) { return Object.assign({ x: [], y: [], name, mode: "lines", type: "scatter" }, extra); }

function jobView(root, jobId) {
  const S = {
    job: null, after: null, points: 0, evalSteps: 0, gatesStep: null, gatesFinal: false,
    seen: new Set(), reportShown: false, target: null,
    loss: { loss: series("loss"), task: series("task loss"), sparsity: series("sparsity loss"), eval: series("eval loss", { mode: "lines+markers" }) },
    metric: {}, sp: { train: series("measured (train)"), eval: series("measured (eval)", { mode: "lines+markers" }) },
    lr: series("learning rate"),
  };
  const err = h("p", { class: "error", role: "alert", hidden: true });
  const head = h("div", { class: "card", id: "job-head" }, h("p", { class: "muted" }, "Loading…"));
  const charts = {
    loss: h("div", { class: "chart", id: "chart-loss" }), metric: h("div", { class: "chart", id: "chart-metric" }),
    sparsity: h("div", { class: "chart", id: "chart-sparsity" }), lr: h("div", { class: "chart", id: "chart-lr" }),
  };
  const noPoints = h("p", { class: "empty", id: "no-metrics" }, "No training steps yet: the charts fill in as soon as the job trains.");
  const events = h("ul");
  const gates = h("div", { id: "gatemap" }, h("p", { class: "empty" }, "The gate map appears after the first evaluation."));
  const report = h("div", { id: "report" }, h("p", { class: "empty" }, "The compression report appears when the job has succeeded."));
  const ckpts = h("div", { id: "checkpoints" }, h("p", { class: "empty" }, "No checkpoints yet."));
  const play = h("div", { id: "playground" }, h("p", { class: "empty" }, "The playground opens when the fine-tuned model exists."));
  root.append(head, err,
    h("div", { class: "card" }, h("h2", {}, "Training"), noPoints,
      h("div", { class: "grid" }, ...Object.values(charts))),
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("h2", {}, "Gate map: heads and FFN neurons kept"), gates),
      h("div", { class: "card events", id: "events" }, h("h2", {}, "Events"), events)),
    h("div", { class: "card" }, h("h2", {}, "Compression report"), report),
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("h2", {}, "Checkpoints"), ckpts),
      h("div", { class: "card" }, h("h2", {}, "Playground"), play)));

  function drawCharts() {
    const tgt = S.target == null ? [] : [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: S.target, y1: S.target, line: { dash: "dash", color: "#c23b3b" } }];
    plot(charts.loss, Object.values(S.loss), { title: { text: "Loss and its parts" }, xaxis: { title: { text: "step" } } });
    const ms = Object.values(S.metric);
    plot(charts.metric, ms.length ? ms : [series("no evaluation yet")], { title: { text: "Task metric (evaluation)" }, xaxis: { title: { text: "step" } } });
    plot(charts.sparsity, [S.sp.train, S.sp.eval], {
      title: { text: `Measured sparsity vs target${S.target == null ? "" : ` (${pct(S.target)}, dashed)`}` },
      xaxis: { title: { text: "step" } }, yaxis: { rangemode: "tozero", tickformat: ".0%" }, shapes: tgt,
    });
    plot(charts.lr, [S.lr], { title: { text: "Learning rate (gates)" }, xaxis: { title: { text: "step" } }, yaxis: { exponentformat: "e" } });
    charts.loss.dataset.points = String(S.points);
    noPoints.hidden = S.points > 0;
  }

  function addPoint(p) {
    const m = p.metrics || {};
    if (p.kind === "train") {
      S.points++;
      const push = (s, y) => { if (y != null) { s.x.push(p.step); s.y.push(y); } };
      push(S.loss.loss, p.loss); push(S.loss.task, m.task_loss); push(S.loss.sparsity, m.sparsity_loss);
      push(S.lr, p.lr); push(S.sp.train, p.measured_sparsity);
    } else {
      S.evalSteps++;
      if (p.loss != null) { S.loss.eval.x.push(p.step); S.loss.eval.y.push(p.loss); }
      if (p.measured_sparsity != null) { S.sp.eval.x.push(p.step); S.sp.eval.y.push(p.measured_sparsity); }
      for (const [k, v] of Object.entries(m)) {
        if (k === "eval_loss" || typeof v !== "number") continue;
        const s = S.metric[k] || (S.metric[k] = series(k, { mode: "lines+markers" }));
        s.x.push(p.step); s.y.push(v);
      }
    }
  }

  async function pollMetrics() {
    // incremental: only points after the last one seen (the `after` cursor)
    let added = 0;
    for (let i = 0; i < 20; i++) {
      const q = new URLSearchParams({ limit: "1000" });
      if (S.after) q.set("after", S.after);
      const page = await api("GET", `/v1/fine_tuning/jobs/${jobId}/metrics?${q}`);
      page.data.forEach(addPoint);
      added += page.data.length;
      if (page.data.length) S.after = page.data[page.data.length - 1].id;
      if (!page.has_more) break;
    }
    if (added || !charts.loss.dataset.points) drawCharts();
  }

  async function pollEvents() {
    const page = await api("GET", `/v1/fine_tuning/jobs/${jobId}/events?limit=50`);
    const fresh = page.data.filter((e) => !S.seen.has(e.id));
    fresh.reverse().forEach((e) => {
      S.seen.add(e.id);
      events.prepend(h("li", { class: e.level }, h("span", { class: "muted" }, new Date(e.created_at * 1000).toLocaleTimeString(), " "), e.message));
    });
    if (!events.children.length) events.append(h("li", { class: "muted" }, "No events yet."));
  }

  async function pollGates() {
    const final = S.job.status === "succeeded" && S.job.fine_tuned_model;
    if (S.gatesFinal || (!final && S.evalSteps === S.gatesStep)) return;
    const g = await api("GET", `/v1/fine_tuning/jobs/${jobId}/gates`);
    S.gatesStep = S.evalSteps;
    if (g.source === "plan") S.gatesFinal = true;
    if (!g.layers || !g.layers.length) return;
    drawGates(gates, g);
  }

  async function loadReport() {
    const mid = S.job.fine_tuned_model;
    if (S.reportShown || !mid) return;
    S.reportShown = true;
    try {
      const r = await api("GET", `/v1/models/${encodeURIComponent(mid)}/report`);
      drawReport(report, r);
    } catch (e) {
      report.replaceChildren(h("p", { class: "error" }, e.message));
    }
    drawPlayground(play, S.job);
  }

  async function loadCheckpoints() {
    const page = await api("GET", `/v1/fine_tuning/jobs/${jobId}/checkpoints?limit=20`);
    if (!page.data.length) return;
    ckpts.replaceChildren(h("table", {},
      h("thead", {}, h("tr", {}, ["Step", "Metrics", "Created"].map((t) => h("th", {}, t)))),
      h("tbody", {}, page.data.map((c) => h("tr", {},
        h("td", {}, c.step_number),
        h("td", { class: "mono" }, Object.entries(c.metrics || {}).filter(([k]) => k !== "step")
          .map(([k, v]) => `${k}=${typeof v === "number" ? v.toFixed(4) : v}`).join("  ")),
        h("td", {}, fmtTime(c.created_at)))))));
  }

  let lastStatus = null;
  return poller(async () => {
    S.job = await api("GET", `/v1/fine_tuning/jobs/${jobId}`);
    S.target = S.job.sparsity ? S.job.sparsity.target : null;
    drawHead(head, S.job, err);
    await pollMetrics();
    await pollEvents();
    await pollGates();
    if (S.job.status !== lastStatus || !TERMINAL.has(S.job.status)) await loadCheckpoints();
    lastStatus = S.job.status;
    if (S.job.status === "succeeded") await loadReport();
    return !(TERMINAL.has(S.job.status) && (S.gatesFinal || S.job.status !== "succeeded"));
  }, POLL_MS, err);
}

function drawHead(head, job, err) {
  const actions = h("div", { class: "actions" });
  if (!TERMINAL.has(job.status)) {
    actions.append(h("button", {
      type: "button", class: "danger", id: "cancel-job", disabled: job.cancel_requested || null,
      onclick: async (ev) => {
        if (!window.confirm(`Cancel job ${job.id}? Training stops at its next step.`)) return;
        ev.target.disabled = true;
        try { await api("POST", `/v1/fine_tuning/jobs/${job.id}/cancel`); } catch (e) { showError(err, e); ev.target.disabled = false; }
      },
    }, job.cancel_requested ? "Cancelling…" : "Cancel job"));
  }
  if (job.fine_tuned_model) {
    for (const fmt of ["tar", "safetensors", "onnx"]) {
      actions.append(h("button", { type: "button", class: "secondary", "data-format": fmt, onclick: (ev) => download(job.fine_tuned_model, fmt, ev.target, err) }, `Download ${fmt}`));
    }
  }
  const p = job.progress || {};
  head.replaceChildren(
    h("div", { class: "row" },
      h("div", {}, h("h1", {}, "Job ", h("code", {}, job.id), " ", badge(job.status)),
        h("div", { class: "muted" }, `${job.task} on ${job.model}`, job.suffix ? ` · ${job.suffix}` : "")),
      h("div", {}, actions)),
    h("dl", { class: "kv" },
      h("dt", {}, "Progress"), h("dd", {}, progressBar(job)),
      h("dt", {}, "Sparsity"), h("dd", {}, `target ${pct(job.sparsity.target)}, measured ${pct(job.sparsity.measured)}`),
      job.queue_position != null ? [h("dt", {}, "Queue position"), h("dd", {}, `#${job.queue_position}`)] : null,
      h("dt", {}, "Created / finished"), h("dd", {}, `${fmtTime(job.created_at)} / ${fmtTime(job.finished_at)}`),
      job.fine_tuned_model ? [h("dt", {}, "Model"), h("dd", {}, h("code", { id: "ft-model" }, job.fine_tuned_model))] : null,
      job.error ? [h("dt", {}, "Error"), h("dd", { class: "error", id: "job-error" }, `${job.error.message}${job.error.param ? ` (${job.error.param})` : ""}`)] : null,
      h("dt", {}, "Steps"), h("dd", {}, p.total_steps ? `${p.step} of ${p.total_steps}` : "—")));
}

async function download(modelId, fmt, btn, err) {
  btn.disabled = true;
  const old = btn.textContent; btn.textContent = "Downloading…";
  try {
    const resp = await api("GET", `/v1/models/${encodeURIComponent(modelId)}/artifact?format=${fmt}`, { raw: true });
    const blob = await resp.blob();
    const a = h("a", { href: URL.createObjectURL(blob), download: `${modelId.replace(/[:/]/g, "_")}.${fmt}` });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  } catch (e) { showError(err, e); }
  btn.disabled = false; btn.textContent = old;
}

// ------------------------------------------------------------------ gate map
function drawGates(root, g) {
  const layers = g.layers;
  const H = g.num_heads;
  const ylab = layers.map((l) => `layer ${l.index}`);
  const heads = layers.map((l) => { const k = new Set(l.heads_kept); return Array.from({ length: H }, (_, i) => (k.has(i) ? 1 : 0)); });
  const ffn = layers.map((l) => l.ffn_bins);
  const t = g.totals || {};
  const when = g.source === "plan" ? "final, from the pruning plan" : `evaluation at step ${g.step}`;
  const hm = h("div", { class: "chart tall", id: "gatemap-heads" });
  const fm = h("div", { class: "chart tall", id: "gatemap-ffn" });
  const rows = layers.map((l) => h("tr", {},
    h("td", {}, l.index), h("td", {}, `${l.heads.kept}/${l.heads.total}`),
    h("td", {}, `${l.kv_heads.kept}/${l.kv_heads.total}`),
    h("td", {}, `${l.qk_dims.kept} / ${l.vo_dims.kept} of ${l.qk_dims.total}`),
    h("td", {}, `${fmtInt(l.ffn.kept)}/${fmtInt(l.ffn.total)}`)));
  root.replaceChildren(
    h("p", { class: "muted", id: "gatemap-source", "data-source": g.source }, `${when}: `,
      `${fmtInt(t.heads && t.heads.kept)} of ${fmtInt(t.heads && t.heads.total)} heads and `,
      `${fmtInt(t.ffn && t.ffn.kept)} of ${fmtInt(t.ffn && t.ffn.total)} FFN neurons kept; `,
      `${pct(t.removed_fraction)} of the gated weights removed.`),
    hm, fm,
    h("details", {}, h("summary", {}, "Per layer"), h("table", {},
      h("thead", {}, h("tr", {}, ["Layer", "Heads", "KV groups", "q/k / v/o dims per head", "FFN neurons"].map((x) => h("th", {}, x)))),
      h("tbody", {}, rows))));
  const scale = [[0, "#e4e7ec"], [1, "#2f6fde"]];
  plot(hm, [{ type: "heatmap", z: heads, x: Array.from({ length: H }, (_, i) => `h${i}`), y: ylab, zmin: 0, zmax: 1, colorscale: scale, showscale: false, xgap: 2, ygap: 2,
    hovertemplate: "%{y}, head %{x}: %{z}<extra>1 = kept, 0 = removed</extra>" }],
  { title: { text: "Attention heads (blue = kept)" }, yaxis: { autorange: "reversed" } });
  plot(fm, [{ type: "heatmap", z: ffn, y: ylab, zmin: 0, zmax: 1, colorscale: scale, colorbar: { title: { text: "kept" }, tickformat: ".0%" }, ygap: 2,
    hovertemplate: "%{y}, FFN slice %{x}: %{z:.0%} kept<extra></extra>" }],
  { title: { text: `FFN neurons kept per slice of ${Math.ceil(g.intermediate_size / Math.max(1, (ffn[0] || []).length))}` }, yaxis: { autorange: "reversed" }, xaxis: { title: { text: "neuron slice" } } });
}

// ------------------------------------------------------------------ report
function drawReport(root, r) {
  if (r.partial) {
    root.replaceChildren(h("p", { class: "muted" }, "Only the summary exists (the latency report was not produced; see the events)."),
      h("pre", { class: "mono" }, JSON.stringify(r.summary, null, 2)));
    return;
  }
  const fs = r.file_sizes || {};
  const kv = h("dl", { class: "kv", id: "report-figures" },
    h("dt", {}, "Parameters"), h("dd", {}, `${fmtInt(r.params_before)} → ${fmtInt(r.params_after)} (${pct(r.params_removed_fraction)} removed)`),
    h("dt", {}, "Gated weights removed"), h("dd", {}, pct(r.gated_removed_fraction)),
    h("dt", {}, "File size"), h("dd", {}, `${fmtBytes(fs.dense_fp32_estimate)} dense (fp32 estimate) → ${fmtBytes(fs["model.safetensors"])} model.safetensors`
      + (fs["model.onnx"] ? `, ${fmtBytes(fs["model.onnx"])} model.onnx` : "")),
    r.flop_ideal_ratio != null ? [h("dt", {}, "FLOP-ideal latency ratio"), h("dd", {}, r.flop_ideal_ratio.toFixed(3))] : null);
  const size = h("div", { class: "chart", id: "report-size" });
  const lat = h("div", { class: "chart tall", id: "report-latency" });
  root.replaceChildren(kv, h("div", { class: "grid" }, size, lat));
  plot(size, [
    { type: "bar", name: "dense", x: ["parameters", "file size (MB)"], y: [r.params_before, (fs.dense_fp32_estimate || 0) / 1048576] },
    { type: "bar", name: "pruned", x: ["parameters", "file size (MB)"], y: [r.params_after, (fs["model.safetensors"] || 0) / 1048576] },
  ], { title: { text: "Size before / after" }, barmode: "group", yaxis: { type: "log" } });
  const rows = r.latency || [];
  if (!rows.length) { lat.textContent = "No latency was measured."; return; }
  const x = rows.map((l) => `${l.backend} b${l.batch}×${l.seq_len}`);
  plot(lat, [
    { type: "bar", name: "dense (ms)", x, y: rows.map((l) => l.dense_ms) },
    { type: "bar", name: "pruned (ms)", x, y: rows.map((l) => l.pruned_ms), text: rows.map((l) => `${l.ratio.toFixed(2)}×`), textposition: "outside" },
    { type: "scatter", mode: "markers", name: "FLOP-ideal pruned (ms)", x, y: rows.map((l) => l.dense_ms * l.flop_ideal_ratio),
      marker: { symbol: "line-ew-open", size: 28, line: { width: 3, color: "#c23b3b" } } },
  ], { title: { text: "Latency dense vs pruned per backend and shape" }, barmode: "group", yaxis: { title: { text: "ms (median)" } } });
}

// ------------------------------------------------------------------ playground
function drawPlayground(root, job) {
  const ft = job.fine_tuned_model;
  const classify = job.task === "classification";
  const input = h(classify ? "textarea" : "textarea", { id: "play-input", placeholder: classify ? "Text to classify" : "Message to the model" });
  const panes = { [ft]: h("div", { class: "pane", "data-model": "finetuned" }), [job.model]: h("div", { class: "pane", "data-model": "base" }) };
  const btn = h("button", { type: "button", id: "play-run" }, classify ? "Classify with both" : "Send to both");
  btn.addEventListener("click", () => {
    const text = input.value.trim();
    if (!text) { input.focus(); return; }
    for (const [model, pane] of Object.entries(panes)) (classify ? runClassify : runChat)(model, text, pane);
  });
  root.replaceChildren(
    h("p", { class: "muted" }, `The fine-tuned, pruned model next to its dense base (${job.model}), with the time each took.`),
    input, btn,
    h("div", { class: "grid", style: "margin-top:12px" },
      h("div", {}, h("strong", {}, "Fine-tuned (pruned)"), h("div", { class: "muted mono" }, ft), panes[ft]),
      h("div", {}, h("strong", {}, "Dense base"), h("div", { class: "muted mono" }, job.model), panes[job.model])));
}

async function runClassify(model, text, pane) {
  pane.replaceChildren(h("span", { class: "muted" }, "…"));
  const t0 = performance.now();
  try {
    const r = await api("POST", "/v1/classify", { json: { model, input: [text] } });
    const ms = performance.now() - t0;
    const c = r.data[0];
    pane.replaceChildren(h("div", { class: "answer" }, h("strong", {}, c.label), ` (score ${Number(c.score).toFixed(3)})`),
      h("div", { class: "muted time" }, `${ms.toFixed(0)} ms`));
  } catch (e) {
    pane.replaceChildren(h("p", { class: "error" }, e.message));
  }
}

async function runChat(model, text, pane) {
  const out = h("pre", { class: "answer" });
  const time = h("div", { class: "muted time" }, "…");
  pane.replaceChildren(out, time);
  const t0 = performance.now();
  let first = null;
  try {
    const resp = await api("POST", "/v1/chat/completions", { raw: true, json: { model, stream: true, max_tokens: 64, messages: [{ role: "user", content: text }] } });
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { out.append(h("span", { class: "error" }, ` ${chunk.error.message}`)); continue; }
        const d = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (d && d.content) { if (first == null) first = performance.now() - t0; out.append(d.content); }
      }
    }
    const ms = performance.now() - t0;
    time.textContent = `${ms.toFixed(0)} ms in all` + (first != null ? `, first token after ${first.toFixed(0)} ms` : "");
  } catch (e) {
    pane.replaceChildren(h("p", { class: "error" }, e.message));
  }
}

// ------------------------------------------------------------------ new job
function uploadFile(file, onProgress) {
  // XMLHttpRequest, not fetch: it reports upload progress
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/files");
    xhr.setRequestHeader("Authorization", `Bearer ${sessionStorage.getItem(KEY) || ""}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onerror = () => reject(new ApiError(0, { error: { message: "The upload could not reach the server." } }));
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body); else reject(new ApiError(xhr.status, body));
    };
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

function fileDrop(id, label, onFile) {
  const input = h("input", { type: "file", id: `${id}-input`, name: id, accept: ".jsonl,.json,.csv,.txt", hidden: true });
  const zone = h("div", { class: "drop", id: `${id}-drop`, tabindex: "0" }, label);
  const bar = h("div", { class: "bar", hidden: true }, h("span", { style: "width:0%" }));
  const status = h("div", { class: "muted", id: `${id}-status` });
  const error = h("p", { class: "error", id: `${id}-error`, role: "alert", hidden: true });
  const state = { fileId: null };
  async function take(file) {
    if (!file) return;
    error.hidden = true; state.fileId = null; bar.hidden = false;
    status.textContent = `Uploading ${file.name} (${fmtBytes(file.size)})…`;
    try {
      const f = await uploadFile(file, (x) => { bar.firstChild.style.width = `${(100 * x).toFixed(0)}%`; });
      state.fileId = f.id;
      status.textContent = `${f.filename}: ${f.id}` + (f.task ? `, ${f.task}` : "") + (f.n_rows != null ? `, ${f.n_rows} rows` : "") + " — validated";
      onFile(f);
    } catch (e) {
      status.textContent = `${file.name} was refused:`;
      showError(error, e);
    }
    bar.hidden = true;
  }
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); take(e.dataTransfer.files[0]); });
  input.addEventListener("change", () => take(input.files[0]));
  return { el: h("div", {}, zone, input, bar, status, error), state };
}

function newJobView(root) {
  const err = h("p", { class: "error", id: "create-error", role: "alert", hidden: true });
  const model = h("select", { id: "model", name: "model" });
  const task = h("select", { id: "task", name: "task" }, ["", "classification", "causal_lm", "sparsify"].map((t) => h("option", { value: t }, t || "detect from the file")));
  const num = (id, value, attrs = {}) => h("input", Object.assign({ id, name: id, type: "number", value }, attrs));
  const fields = {
    target_sparsity: num("target_sparsity", "0.3", { min: "0", max: "0.95", step: "0.05" }),
    max_steps: num("max_steps", "", { min: "1", placeholder: "auto (from epochs)" }),
    n_epochs: num("n_epochs", "", { min: "1", placeholder: "auto" }),
    batch_size: num("batch_size", "", { min: "1", placeholder: "auto" }),
    learning_rate: num("learning_rate", "", { step: "any", placeholder: "auto" }),
    max_length: num("max_length", "", { min: "8", placeholder: "auto" }),
    eval_interval: num("eval_interval", "", { min: "1", placeholder: "auto" }),
  };
  const trainable = h("select", { id: "trainable", name: "trainable" }, ["gates", "gates+lora", "gates+weights"].map((t) => h("option", { value: t }, t)));
  const suffix = h("input", { id: "suffix", name: "suffix", maxlength: "40", placeholder: "optional, e.g. reviews" });
  const train = fileDrop("training-file", "Drop the training file here (JSONL or CSV), or click to choose it", (f) => { if (f.task) task.value = ""; });
  const valid = fileDrop("validation-file", "Optional: a validation file (otherwise 10% of the training file is held out)", () => {});
  const submit = h("button", { type: "submit", id: "create-job" }, "Start fine-tuning");
  const label = (text, el, hint) => h("div", {}, h("label", { for: el.id }, text), el, hint ? h("div", { class: "muted" }, hint) : null);
  const form = h("form", { id: "new-job-form" },
    h("h1", {}, "New fine-tuning job"),
    h("label", {}, "Training file"), train.el,
    h("label", {}, "Validation file"), valid.el,
    h("div", { class: "row" }, label("Base model", model), label("Task", task)),
    h("div", { class: "row" },
      label("Target sparsity", fields.target_sparsity, "share of the gated weights physically removed"),
      label("Trainable", trainable), label("Suffix", suffix)),
    h("div", { class: "row" }, label("Max steps", fields.max_steps), label("Epochs", fields.n_epochs),
      label("Batch size", fields.batch_size), label("Gate learning rate", fields.learning_rate), label("Max length", fields.max_length),
      label("Evaluate every", fields.eval_interval, "steps")),
    submit, err);
  root.append(h("div", { class: "card" }, form));
  api("GET", "/v1/models").then((r) => {
    const bases = r.data.filter((m) => m.kind === "base");
    model.replaceChildren(...bases.map((m) => h("option", { value: m.id }, `${m.id}${m.family ? ` (${m.family})` : ""}`)));
    if (!bases.length) showError(err, "This server has no base models registered.");
  }).catch((e) => showError(err, e));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.hidden = true;
    if (!train.state.fileId) { showError(err, "Upload a training file first (it is validated when it arrives)."); return; }
    const hp = {};
    for (const [k, el] of Object.entries(fields)) if (el.value !== "") hp[k] = Number(el.value);
    hp.trainable = trainable.value;
    const body = { model: model.value, training_file: train.state.fileId, method: { type: "finegates", finegates: { hyperparameters: hp } } };
    if (task.value) body.method.finegates.task = task.value;
    if (valid.state.fileId) body.validation_file = valid.state.fileId;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    submit.disabled = true;
    try {
      const job = await api("POST", "/v1/fine_tuning/jobs", { json: body });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      showError(err, e.param ? `${e.message} (field: ${e.param})` : e);
    }
    submit.disabled = false;
  });
  return () => {};
}

// ------------------------------------------------------------------ start
window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", signIn);
  $("#sign-out").addEventListener("click", () => signOut());
  route();
});
