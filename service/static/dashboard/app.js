// The gradtune dashboard: plain JavaScript, no build step, nothing fetched but this API.
// Views by the URL's hash: #/jobs, #/job/<id>, #/studies, #/study/<id>, #/workers, #/datasets, #/models.
"use strict";

const KEY = "gradtune.key";
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const PAGE = 20;
const main = document.getElementById("main");
let stopView = () => {};  // ends the current view's live stream
let generation = 0;  // the current route's number: a slower earlier view must not draw over a newer one
const stale = (gen) => gen !== generation;

class Unauthorized extends Error {}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

const svgNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}) {
  const node = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function fmt(x, digits = 4) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  return Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : Number(x.toPrecision(digits)).toString();
}

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  if (!key) throw new Unauthorized("no key yet");
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } });
  if (response.status === 401) throw new Unauthorized((await response.json()).detail);
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  return body;
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header).
async function follow(path, onEvent, signal) {
  const key = sessionStorage.getItem(KEY);
  const response = await fetch(path, { headers: { Authorization: `Bearer ${key}`, Accept: "text/event-stream" }, signal });
  if (!response.ok) throw new Error(`events: ${response.status}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", event = {};
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (line === "") {
        if (event.data !== undefined) onEvent(event.event || "message", JSON.parse(event.data), event.id);
        event = {};
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        event[field] = field === "data" && event.data !== undefined ? `${event.data}\n${val}` : val;
      }
    }
  }
}

function statusBadge(status) { return el("span", { class: `status ${status}` }, status); }

function progressBar(p) {
  const pct = p.iterations ? Math.round((100 * p.iteration) / p.iterations) : 0;
  return el("span", {}, el("span", { class: "bar", title: `${pct}%` }, el("span", { style: `width:${pct}%` })), ` ${p.iteration}/${p.iterations}`);
}

// A line chart of (x, y) points as SVG; one circle per point (data-points counts them).
function chart(title, points, { log = false, xLabel = "iteration" } = {}) {
  const W = 360, H = 170, L = 46, R = 8, T = 10, B = 22;
  const box = svg("svg", { viewBox: `0 0 ${W} ${H}`, "data-points": String(points.length), role: "img", "aria-label": title });
  const ys = points.map((p) => (log ? Math.log10(Math.max(p.y, 1e-12)) : p.y)).filter(Number.isFinite);
  const xs = points.map((p) => p.x);
  if (ys.length) {
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (y0 === y1) { y0 -= 0.5 || 1; y1 += 0.5 || 1; }
    const x0 = Math.min(...xs), x1 = Math.max(x0 + 1, ...xs);
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    const label = (v) => fmt(log ? 10 ** v : v, 3);
    for (const v of [y0, y1]) box.append(Object.assign(svg("text", { x: 2, y: sy(v) + 3, class: "axis" }), { textContent: label(v) }));
    box.append(Object.assign(svg("text", { x: L, y: H - 6, class: "axis" }), { textContent: `${xLabel} ${x0}` }));
    box.append(Object.assign(svg("text", { x: W - R - 40, y: H - 6, class: "axis" }), { textContent: String(x1) }));
    const drawn = points.filter((p) => Number.isFinite(log ? Math.log10(p.y) : p.y));
    const y = (p) => sy(log ? Math.log10(p.y) : p.y);
    box.append(svg("polyline", { points: drawn.map((p) => `${sx(p.x)},${y(p)}`).join(" ") }));
    for (const p of drawn) box.append(svg("circle", { cx: sx(p.x), cy: y(p), r: 2.4, class: p.accepted === false ? "rejected" : "" }));
  }
  return el("div", { class: "chart" }, el("h3", {}, title), box);
}

function sparkline(values) {
  const box = svg("svg", { width: 100, height: 22, viewBox: "0 0 100 22" });
  const ys = values.filter(Number.isFinite);
  if (ys.length > 1) {
    const y0 = Math.min(...ys), y1 = Math.max(...ys) || 1;
    const pts = ys.map((v, i) => `${(100 * i) / (ys.length - 1)},${20 - (18 * (v - y0)) / (y1 - y0 || 1)}`);
    box.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: "#2f6fde", "stroke-width": 1.4 }));
  }
  return box;
}

// "‹ newer", the rows shown, "older ›": a page of a newest-first listing; go({ offset }) moves.
function pager(page, offset, go) {
  return [
    el("button", { disabled: offset <= 0 ? "" : null, onclick: () => go({ offset: Math.max(0, offset - PAGE) }) }, "‹ newer"),
    el("span", { class: "muted" }, `${page.total ? offset + 1 : 0}–${offset + page.items.length}`),
    el("button", { disabled: offset + PAGE >= page.total ? "" : null, onclick: () => go({ offset: offset + PAGE }) }, "older ›")];
}

// ------------------------------------------------------------------ views

async function jobsView(params) {
  const status = params.get("status") || "";
  const offset = Number(params.get("offset") || 0);
  const query = new URLSearchParams({ limit: PAGE, offset });
  if (status) query.set("status", status);
  const gen = generation;
  const page = await api(`/v1/jobs?${query}`);
  if (stale(gen)) return;
  const filter = el("select", { id: "status-filter", onchange: (e) => go({ status: e.target.value, offset: 0 }) },
    el("option", { value: "" }, "all statuses"), ...STATUSES.map((s) => el("option", { value: s }, s)));
  filter.value = status;
  const go = (p) => { location.hash = `#/jobs?${new URLSearchParams({ status: p.status ?? status, offset: p.offset ?? offset })}`; };
  const rows = page.items.map((job) => {
    const spark = el("td", { class: "spark" });
    api(`/v1/jobs/${job.id}/history`).then((h) => spark.append(sparkline(h.items.map((i) => i.meta_loss)))).catch(() => {});
    return el("tr", { "data-job": job.id },
      el("td", {}, el("a", { href: `#/job/${job.id}` }, job.name)),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, progressBar(job.progress)),
      el("td", { class: "num" }, fmt(job.progress.meta_loss)),
      spark,
      el("td", { class: "muted" }, job.tenant),
      el("td", { class: "muted" }, new Date(job.created_at).toLocaleString()));
  });
  main.replaceChildren(
    el("h1", {}, "Jobs"),
    el("div", { class: "toolbar" }, filter, el("span", { class: "muted" }, `${page.total} job(s)`), pager(page, offset, go)),
    el("table", { id: "jobs" },
      el("thead", {}, el("tr", {}, ...["name", "status", "progress", "meta-loss", "", "tenant", "created"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)));
}

// Python's repr of the values: floats keep a ".0" (lr=1.0), strings single-quoted.
function pyRepr(v, integer = false) {
  if (Array.isArray(v)) return `[${v.map((x) => pyRepr(x, integer)).join(", ")}]`;
  if (typeof v === "string") return `'${v.replace(/\\/g, "\\\\").replace(/'/g, "\\'")}'`;
  const s = String(v);
  return integer || /[.eEIN]/.test(s) ? s : `${s}.0`;
}

function pythonSnippet(s) {
  if (!s.param_groups) {
    return `import torch\noptimizer = torch.optim.SGD(model.parameters(), lr=${pyRepr(s.lr)}, momentum=${pyRepr(s.momentum)})\n`;
  }
  const lines = ["import bisect", "import torch", "", "named = dict(model.named_parameters())",
    `boundaries = ${pyRepr(s.boundaries || [0], true)}`, "param_groups = ["];
  for (const g of s.param_groups) lines.push(`    {'params': ${pyRepr(g.params)}, 'lr': ${pyRepr(g.lr)}, 'momentum': ${pyRepr(g.momentum)}},`);
  lines.push("]", "optimizer = torch.optim.SGD(",
    "    [{'params': [named[n] for n in g['params']], 'lr': g['lr'][0], 'momentum': g['momentum'][0]}",
    "     for g in param_groups], lr=param_groups[0]['lr'][0])", "",
    "def apply_schedule(step):  # call before optimizer.step() at every step",
    "    seg = max(0, bisect.bisect_right(boundaries, step) - 1)",
    "    for group, g in zip(optimizer.param_groups, param_groups):",
    "        group['lr'], group['momentum'] = g['lr'][seg], g['momentum'][seg]");
  return lines.join("\n") + "\n";
}

function heatmap(title, groups, field, log) {
  const values = groups.flatMap((g) => g[field]);
  const t = (v) => (log ? Math.log10(v) : v);
  const lo = Math.min(...values.map(t)), hi = Math.max(...values.map(t));
  const light = (v) => 92 - 50 * ((t(v) - lo) / (hi - lo || 1));
  const color = (v) => `background:hsl(220, 70%, ${light(v)}%);color:${light(v) < 62 ? "#fff" : "inherit"}`;
  const segments = groups[0][field].length;
  return el("div", {},
    el("h2", {}, title),
    el("table", { class: "heatmap", "data-field": field },
      el("thead", {}, el("tr", {}, el("th", {}, "parameters"), ...Array.from({ length: segments }, (_, i) => el("th", {}, `segment ${i + 1}`)))),
      el("tbody", {}, groups.map((g) => el("tr", {}, el("td", {}, g.params.join(", ")),
        ...g[field].map((v) => el("td", { style: color(v) }, fmt(v, 3))))))));
}

const facts = (pairs) => el("dl", { class: "facts" }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));

// Settings as a job's or a study's settings give them: their lr and momentum (and `extra` facts), the
// per-layer x segment heatmaps, `between` (e.g. an evaluation) and the torch.optim.SGD snippet.
function settingsParts(title, s, extra = [], between = []) {
  const code = pythonSnippet(s);
  const copy = el("button", { id: "copy", onclick: async () => { await navigator.clipboard.writeText(code).catch(() => {}); copy.textContent = "copied"; } }, "copy");
  return [
    el("h2", {}, title),
    facts([["lr", fmt(s.lr, 6)], ["momentum", fmt(s.momentum, 6)], ...extra]),
    s.param_groups ? [heatmap("Learning rate per layer × segment", s.param_groups, "lr", true),
      heatmap("Momentum per layer × segment", s.param_groups, "momentum", false)] : [],
    between,
    el("h2", {}, "In your training script ", copy), el("pre", { id: "snippet" }, code)];
}

// Validation losses: a row per task ([label, ...losses]), then the mean row.
function lossTable(id, heads, rows, mean) {
  const cells = (values) => values.map((v) => el("td", { class: "num" }, fmt(v)));
  return el("table", { id },
    el("thead", {}, el("tr", {}, heads.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map(([label, ...values]) => el("tr", {}, el("td", {}, label), cells(values))),
      el("tr", { class: "mean" }, el("th", {}, "mean"), cells(mean))));
}

async function settingsPanel(job) {
  const s = await api(`/v1/jobs/${job.id}/settings`);
  const ev = s.evaluation || {};
  const groups = ev.mean_learned_groups_val_loss !== undefined && ev.mean_learned_groups_val_loss !== null;
  const losses = (o, start, pair, rich) => [o[start], o[pair], ...(groups ? [o[rich]] : [])];
  const evaluation = !ev.tasks ? [] : [el("h2", {}, "Evaluation: validation loss after torch.optim.SGD training"),
    lossTable("evaluation", ["task", "with the start", "with the learned lr, momentum", ...(groups ? ["with the learned per-layer / schedule values"] : [])],
      ev.tasks.map((t) => [t.name, ...losses(t, "initial_val_loss", "learned_val_loss", "learned_groups_val_loss")]),
      losses(ev, "mean_initial_val_loss", "mean_learned_val_loss", "mean_learned_groups_val_loss"))];
  const method = [["method", s.method || "–"], ["fallback", s.fallback || "none"]];
  return el("div", { class: "card", id: "settings" }, settingsParts("Learned settings", s, method, evaluation));
}

async function jobView(id) {
  const gen = generation;
  let job = await api(`/v1/jobs/${id}`);
  if (stale(gen)) return;
  const points = [];
  const head = el("div", { class: "card", id: "job-head" });
  const charts = el("div", { class: "charts", id: "charts" });
  const after = el("div");
  const draw = () => {
    head.replaceChildren(
      el("h1", {}, job.name, " ", statusBadge(job.status)),
      el("dl", { class: "facts" },
        el("dt", {}, "id"), el("dd", {}, job.id), el("dt", {}, "tenant"), el("dd", {}, job.tenant),
        el("dt", {}, "progress"), el("dd", {}, progressBar(job.progress)),
        el("dt", {}, "meta-loss"), el("dd", {}, fmt(job.progress.meta_loss)),
        el("dt", {}, "lr / momentum"), el("dd", {}, `${fmt(job.progress.lr)} / ${fmt(job.progress.momentum)}`),
        ...(job.study ? [el("dt", {}, "study"), el("dd", {}, el("a", { href: `#/study/${job.study}`, id: "job-study" }, job.study))] : []),
        ...(job.device && job.device !== "auto" ? [el("dt", {}, "device"), el("dd", {}, job.device)] : []),
        ...(job.waiting ? [el("dt", {}, "waiting"), el("dd", { class: "waiting" }, job.waiting)] : []),
        ...(job.error ? [el("dt", {}, "error"), el("dd", { class: "error" }, job.error)] : []),
        ...(job.stopped ? [el("dt", {}, "stopped"), el("dd", {}, job.stopped)] : [])),
      TERMINAL.has(job.status) ? "" : el("p", {}, el("button", { id: "cancel", class: "danger", disabled: job.cancel_requested ? "" : null, onclick: cancel },
        job.cancel_requested ? "cancel requested" : "Cancel job")));
    charts.replaceChildren(
      chart("meta-loss", points.map((p) => ({ x: p.iteration, y: p.meta_loss, accepted: p.accepted }))),
      chart("learning rate", points.map((p) => ({ x: p.iteration, y: p.lr, accepted: p.accepted })), { log: true }),
      chart("momentum", points.map((p) => ({ x: p.iteration, y: p.momentum, accepted: p.accepted }))));
  };
  const cancel = async () => {
    try { job = await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); draw(); }
    catch (e) { head.append(el("p", { class: "error" }, e.message)); }
  };
  main.replaceChildren(head, charts, after);
  draw();
  const controller = new AbortController();
  stopView = () => controller.abort();
  const onEvent = (kind, data) => {
    if (kind === "iteration") {
      points.push(data);
      job.progress = { ...job.progress, iteration: data.iteration, meta_loss: data.meta_loss, lr: data.lr, momentum: data.momentum };
    } else if (kind === "status") {
      job = data;
    }
    draw();
    if (kind === "status" && job.status === "succeeded") settingsPanel(job).then((p) => after.replaceChildren(p)).catch((e) => after.replaceChildren(el("p", { class: "error" }, e.message)));
  };
  try {
    await follow(`/v1/jobs/${id}/events`, onEvent, controller.signal);
    if (!TERMINAL.has(job.status)) throw new Error("the event stream ended before the job did");
  } catch (e) {
    if (e.name === "AbortError") return;
    // polling fallback
    while (!TERMINAL.has(job.status) && !controller.signal.aborted) {
      await new Promise((r) => setTimeout(r, 1000));
      const h = await api(`/v1/jobs/${id}/history`);
      points.splice(0, points.length, ...h.items);
      onEvent("status", await api(`/v1/jobs/${id}`));
    }
  }
}

// ------------------------------------------------------------------ studies

const jobLink = (id) => el("a", { href: `#/job/${id}`, class: "job-link" }, id.slice(0, 8));
const shape = (hp) => (hp.per_layer ? "per layer" : "lr, momentum") + (hp.schedule_segments > 1 ? ` × ${hp.schedule_segments} segments` : "");
const brief = (st) => `lr ${fmt(st.lr)}, momentum ${fmt(st.momentum)}${st.param_groups ? ` (+ ${st.param_groups.length} per-layer groups)` : ""}`;

async function studiesView(params) {
  const offset = Number(params.get("offset") || 0);
  const gen = generation;
  const page = await api(`/v1/studies?${new URLSearchParams({ limit: PAGE, offset })}`);
  if (stale(gen)) return;
  const go = (p) => { location.hash = `#/studies?${new URLSearchParams({ offset: p.offset })}`; };
  const rows = page.items.map((study) => {
    const heldOut = el("td", { class: "num held-out" }, "–"), spark = el("td", { class: "spark" });
    if (study.version) {
      api(`/v1/studies/${study.id}/history`).then((h) => {
        const losses = h.items.map((u) => u.held_out_mean_val_loss ?? NaN);
        heldOut.replaceChildren(fmt(h.items.length ? h.items[h.items.length - 1].held_out_mean_val_loss : null));
        spark.append(sparkline(losses));
      }).catch(() => {});
    }
    return el("tr", { "data-study": study.id },
      el("td", {}, el("a", { href: `#/study/${study.id}` }, study.name)),
      el("td", { class: "muted" }, study.id.slice(0, 8)),
      el("td", {}, shape(study.hyperparameters)),
      el("td", { class: "num" }, String(study.jobs)),
      el("td", { class: "num" }, String(study.version)),
      el("td", { class: "num" }, `${study.pool.tasks} (${study.pool.held_out} held out)`),
      el("td", { class: "num" }, fmt(study.settings.lr)),
      el("td", { class: "num" }, fmt(study.settings.momentum)),
      heldOut, spark,
      el("td", { class: "muted" }, study.tenant),
      el("td", { class: "muted" }, new Date(study.created_at).toLocaleString()));
  });
  main.replaceChildren(
    el("h1", {}, "Studies"),
    el("div", { class: "toolbar" }, el("span", { class: "muted" }, `${page.total} stud${page.total === 1 ? "y" : "ies"}`), pager(page, offset, go)),
    el("table", { id: "studies" },
      el("thead", {}, el("tr", {}, ...["name", "id", "learns", "jobs", "updates", "pool tasks", "lr", "momentum", "held-out val loss", "", "tenant", "created"]
        .map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)));
}

function studyHead(study, history) {
  const hp = study.hyperparameters, m = study.meta, pool = study.pool;
  return el("div", { class: "card", id: "study-head" },
    el("h1", {}, study.name, " ", el("span", { class: "muted" }, "study")),
    facts([["id", study.id], ["tenant", study.tenant],
      ["jobs", [`${study.jobs} named it`, ...(history.items.length ? ["; updated after "] : []),
        ...history.items.flatMap((u, i) => [i ? ", " : "", jobLink(u.job_id)])]],
      ["updates", String(study.version)],
      ["pool", `${pool.tasks} task(s): ${pool.training} training, ${pool.held_out} held out (1 in every ${study.holdout_every} tasks)`],
      ["task kind", study.kind ? Object.entries(study.kind).map(([k, v]) => `${k} ${JSON.stringify(v)}`).join(", ") : "– (set by the first job)"],
      ["created", new Date(study.created_at).toLocaleString()], ["updated", new Date(study.updated_at).toLocaleString()]]),
    el("h2", {}, "Spec"),
    facts([["starting lr / momentum", `${fmt(hp.lr, 6)} / ${fmt(hp.momentum, 6)}`],
      ["lr bounds", `${fmt(hp.lr_bounds[0])} – ${fmt(hp.lr_bounds[1])}`],
      ["momentum bounds", `${fmt(hp.momentum_bounds[0])} – ${fmt(hp.momentum_bounds[1])}`],
      ["per layer", hp.per_layer ? "yes" : "no"], ["schedule segments", String(hp.schedule_segments)],
      ["each update", `${m.rounds} round(s) of ${m.meta_batch} task(s) × ${m.iterations} iteration(s), checked on ${m.check_tasks} other task(s); seed ${m.seed}; evaluated on the first ${m.eval_tasks} held-out task(s)`]]));
}

function studySettings(s) {
  const ev = s.evaluation;
  const evaluation = !ev ? [el("p", { class: "muted" }, s.version ? "No held-out task evaluated yet." : "No job has updated the study yet: these are its starting values.")]
    : [el("h2", {}, `Held-out tasks (${ev.evaluated} evaluated of ${ev.held_out}): validation loss after torch.optim.SGD training`),
      lossTable("study-evaluation", ["held-out task", "with the starting lr, momentum", "with the study's settings"],
        ev.tasks.map((t) => [[t.name, " (job ", jobLink(t.job_id), ")"], t.start_val_loss, t.val_loss]), [ev.mean_start_val_loss, ev.mean_val_loss])];
  return el("div", { class: "card", id: "study-settings" }, settingsParts(`Current settings (update ${s.version})`, s, [], evaluation));
}

function studyHistory(history) {
  const items = history.items;
  const over = (f) => items.map((u) => ({ x: u.version, y: f(u) }));
  return el("div", { class: "card" },
    el("h2", {}, "Updates: the study learned again after each succeeded job"),
    el("div", { class: "charts", id: "study-history" },
      chart("held-out mean val loss", over((u) => u.held_out_mean_val_loss), { xLabel: "update" }),
      chart("learning rate", over((u) => u.after.lr), { log: true, xLabel: "update" }),
      chart("momentum", over((u) => u.after.momentum), { xLabel: "update" })),
    el("table", { id: "study-updates" },
      el("thead", {}, el("tr", {}, ["update", "after job", "before", "after", "rounds kept", "held-out val loss", "seconds"].map((h) => el("th", {}, h)))),
      el("tbody", {}, items.map((u) => el("tr", { "data-version": u.version },
        el("td", { class: "num" }, String(u.version)), el("td", {}, jobLink(u.job_id)), el("td", {}, brief(u.before)), el("td", {}, "→ ", brief(u.after)),
        el("td", {}, `${u.rounds.filter((r) => r.kept).length} / ${u.rounds.length}`, u.note ? el("div", { class: "muted" }, u.note) : ""),
        el("td", { class: "num" }, fmt(u.held_out_mean_val_loss)), el("td", { class: "num" }, fmt(u.seconds, 3)))))));
}

// The study's jobs (GET /v1/jobs?study=<id>: the newest 100), each linked to its page.
function studyJobs(box, page) {
  box.replaceChildren(
    el("h2", {}, "Jobs ", el("span", { class: "muted" }, page.total > page.items.length ? `(the newest ${page.items.length} of ${page.total})` : `(${page.total})`)),
    el("table", { id: "study-jobs" },
      el("thead", {}, el("tr", {}, ["name", "job", "status", "progress", "meta-loss", "created"].map((h) => el("th", {}, h)))),
      el("tbody", {}, page.items.map((job) => el("tr", { "data-job": job.id },
        el("td", {}, el("a", { href: `#/job/${job.id}` }, job.name)), el("td", {}, jobLink(job.id)), el("td", {}, statusBadge(job.status)),
        el("td", {}, progressBar(job.progress)), el("td", { class: "num" }, fmt(job.progress.meta_loss)),
        el("td", { class: "muted" }, new Date(job.created_at).toLocaleString()))))));
}

async function studyView(id) {
  const gen = generation;
  const jobsPath = `/v1/jobs?${new URLSearchParams({ study: id, limit: 100 })}`;
  const load = () => Promise.all(["", "/settings", "/history"].map((p) => api(`/v1/studies/${id}${p}`)).concat(api(jobsPath)));
  let [study, s, history, jobs] = await load();
  if (stale(gen)) return;
  const jobsBox = el("div", { class: "card" });
  const draw = () => { studyJobs(jobsBox, jobs); main.replaceChildren(studyHead(study, history), jobsBox, studySettings(s), studyHistory(history)); };
  draw();
  // Live like a job's page: drawn again when a job joins or an update is recorded, the jobs' table
  // alone when only their progress moved (polled).
  let timer;
  const poll = async () => {
    try {
      const [now, nowJobs] = await Promise.all([api(`/v1/studies/${id}`), api(jobsPath)]);
      if (!stale(gen) && (now.version !== study.version || now.jobs !== study.jobs)) {
        const fresh = await load();
        if (!stale(gen)) { [study, s, history, jobs] = fresh; draw(); }
      } else if (!stale(gen) && JSON.stringify(nowJobs) !== JSON.stringify(jobs)) {
        jobs = nowJobs;
        studyJobs(jobsBox, jobs);
      }
    } catch (e) { /* kept as drawn; the next poll tries again */ }
    if (!stale(gen)) timer = setTimeout(poll, 5000);
  };
  timer = setTimeout(poll, 5000);
  stopView = () => clearTimeout(timer);
}

function tableView(title, path, columns) {
  return async () => {
    const gen = generation;
    const page = await api(path);
    if (stale(gen)) return;
    main.replaceChildren(el("h1", {}, title), el("p", { class: "muted" }, `${page.total} in all`),
      el("table", { id: title.toLowerCase() },
        el("thead", {}, el("tr", {}, columns.map(([h]) => el("th", {}, h)))),
        el("tbody", {}, page.items.map((item) => el("tr", {}, columns.map(([, f]) => el("td", {}, f(item))))))));
  };
}

const workersView = tableView("Workers", "/v1/workers", [
  ["id", (w) => w.id], ["host", (w) => w.host], ["pid", (w) => String(w.pid)], ["device", (w) => w.device],
  ["live", (w) => (w.live ? "live" : "not seen lately")], ["last seen", (w) => new Date(w.last_seen).toLocaleString()],
  ["current job", (w) => (w.current_job ? el("a", { href: `#/job/${w.current_job}` }, w.current_job.slice(0, 8)) : "–")]]);
const datasetsView = tableView("Datasets", "/v1/datasets?limit=100", [
  ["file", (d) => d.filename], ["format", (d) => d.format], ["rows", (d) => fmt(d.rows)], ["bytes", (d) => String(d.size)],
  ["tensors / columns", (d) => (d.tensors.length ? d.tensors : d.columns).map((i) => `${i.name} ${JSON.stringify(i.shape)}`).join(", ")],
  ["id", (d) => d.id]]);
const modelsView = tableView("Models", "/v1/models?limit=100", [
  ["file", (m) => m.filename], ["input", (m) => JSON.stringify(m.input_shape)], ["outputs", (m) => String(m.output_width)],
  ["operators", (m) => m.operators.join(" ")], ["parameters", (m) => String(m.parameter_count)], ["id", (m) => m.id]]);

function keyForm(message) {
  const form = document.getElementById("key-form").content.cloneNode(true);
  main.replaceChildren(form);
  document.getElementById("key-error").textContent = message || "";
  document.getElementById("key").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("key-input").value.trim());
    route();
  });
}

function showWho() {
  const who = document.getElementById("who");
  who.replaceChildren();
  if (sessionStorage.getItem(KEY)) {
    who.append("key set", el("button", { id: "forget", onclick: () => { sessionStorage.removeItem(KEY); route(); } }, "forget key"));
  }
}

async function route() {
  generation += 1;
  stopView();
  stopView = () => {};
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  for (const a of document.querySelectorAll("header nav a")) {  // data-also: "/job/" for "Jobs"
    a.classList.toggle("active", [a.getAttribute("href").slice(1), a.dataset.also].some((p) => p && path.startsWith(p)));
  }
  showWho();
  try {
    if (path.startsWith("/job/")) await jobView(decodeURIComponent(path.slice(5)));
    else if (path.startsWith("/study/")) await studyView(decodeURIComponent(path.slice(7)));
    else if (path === "/studies") await studiesView(params);
    else if (path === "/workers") await workersView();
    else if (path === "/datasets") await datasetsView();
    else if (path === "/models") await modelsView();
    else await jobsView(params);
  } catch (e) {
    if (e instanceof Unauthorized) keyForm(sessionStorage.getItem(KEY) ? e.message : "");
    else if (e.name !== "AbortError") main.replaceChildren(el("p", { class: "error" }, e.message));
  }
}

window.addEventListener("hashchange", route);
route();
