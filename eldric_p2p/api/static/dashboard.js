// eldric-p2p node dashboard: polls the node's JSON endpoints and redraws. No build step, no outside assets.
// Every value from a peer is put into the page with textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const history = [];  // tokens/s samples for the sparkline

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.setAttribute("style", v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmtBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}

// GET a JSON endpoint; {missing: true} for 404/405 (the role is not on this node), {error} otherwise.
async function getJSON(path) {
  try {
    const r = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (r.status === 404 || r.status === 405) return { missing: true };
    if (!r.ok) return { error: "HTTP " + r.status };
    return { data: await r.json() };
  } catch (e) {
    return { error: String(e) };
  }
}

function replace(id, ...nodes) {
  const target = document.getElementById(id);
  target.replaceChildren(...nodes);
}

function unavailable(what, res) {
  if (res.missing) return el("p", { class: "empty" }, what + " not available on this node");
  return el("p", { class: "empty" }, what + ": " + res.error);
}

function memBar(used, total) {
  if (typeof total !== "number" || total <= 0) return el("span", { class: "muted" }, "–");
  const frac = Math.max(0, Math.min(1, used / total));
  return el("span", {},
    el("div", { class: "bar" + (frac > 0.85 ? " hot" : ""), style: "display:inline-block;vertical-align:middle",
                title: fmtBytes(used) + " of " + fmtBytes(total) },
      el("span", { style: "width:" + (frac * 100).toFixed(1) + "%" })),
    el("span", { class: "bar-text" }, fmtBytes(used) + " / " + fmtBytes(total)));
}

function renderNode(res) {
  if (!res.data) { replace("node", el("span", { class: "muted" }, res.missing ? "node info not available" : res.error)); return; }
  const n = res.data;
  replace("node",
    el("strong", {}, n.name || "node"), " ",
    el("code", { class: "muted" }, n.peer_id || ""), " ",
    el("span", { class: "chip" }, (n.roles || []).join(" · ")), " ",
    el("span", { class: "muted" }, n.version ? "v" + n.version : ""));
}

function renderPeers(res) {
  if (!res.data) { replace("peers", unavailable("peer table", res)); return; }
  const peers = Array.isArray(res.data) ? res.data : (res.data.peers || []);
  if (!peers.length) { replace("peers", el("p", { class: "empty" }, "no peers seen yet")); return; }
  const rows = peers.map((p) => {
    const w = p.worker || {};
    const device = w.device || p.device || "–";
    const total = w.offered ?? p.memory_total;
    const free = w.free ?? p.memory_free;
    return el("tr", { class: "peer", "data-peer": p.peer_id },
      el("td", {}, el("strong", {}, p.name || "?"), el("br"), el("code", { class: "muted" }, (p.peer_id || "").slice(0, 16))),
      el("td", {}, device),
      el("td", {}, memBar(typeof total === "number" && typeof free === "number" ? total - free : NaN, total)),
      el("td", {}, (p.roles || []).join(", ")),
      el("td", {}, (p.models || []).join(", ") || "–"),
      el("td", {}, el("span", { class: "chip " + (p.source === "relay" ? "relayed" : "") }, p.source || "–")),
      el("td", { class: "muted" }, p.last_seen_s !== undefined ? p.last_seen_s + " s ago" : ""));
  });
  replace("peers", el("table", {},
    el("thead", {}, el("tr", {}, ...["peer", "device", "memory used / offered", "roles", "models", "found via", "seen"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows)));
}

function stageLink(stage) {
  // How a stage reaches its next hop (the tail: the head, with the tokens): "direct", "punched" or "relayed"
  // once its link is open, and what carries it ("tcp" or "quic").
  return { path: stage.link || null, carrier: stage.link_transport || null };
}

function linkBox(link, arrow) {
  return el("div", { class: "link " + (link.path || ""), title: link.path ? "link " + link.path + (link.carrier ? " over " + link.carrier : "") : "link not open yet" },
    el("span", { class: "arrow" }, arrow), link.path || "link",
    link.carrier ? el("span", { class: "carrier" }, link.carrier) : "");
}

function renderPipelines(res) {
  if (!res.data) { replace("pipelines", unavailable("pipeline status", res)); return; }
  const deps = res.data.deployments || res.data.pipelines || [];
  if (!deps.length) { replace("pipelines", el("p", { class: "empty" }, "no pipeline deployed (POST /api/v1/pipeline/deploy)")); return; }
  const blocks = deps.map((d) => {
    const stages = d.stages || [];
    const n = d.n_layers || stages.reduce((m, s) => Math.max(m, s.end || 0), 0) || 1;
    const map = el("div", { class: "layer-map", "data-deployment": d.id, "data-layers": n });
    stages.forEach((s, i) => {
      const role = s.role || (stages.length === 1 ? "single" : i === 0 ? "head" : i === stages.length - 1 ? "tail" : "middle");
      if (i > 0) map.append(linkBox(stageLink(stages[i - 1]), "→"));  // the previous stage's link to this one
      const count = (s.end ?? 0) - (s.start ?? 0);
      const ticks = el("div", { class: "ticks" });
      for (let k = 0; k < count; k++) ticks.append(el("i", { title: "layer " + ((s.start || 0) + k) }));
      map.append(el("div", {
          class: "seg role-" + role + " state-" + (s.state || "unknown"),
          style: "flex:" + Math.max(count, 1) + " 1 0",
          "data-worker": s.worker, "data-start": s.start, "data-end": s.end, "data-role": role,
          title: (s.worker || "?") + ": layers " + s.start + "–" + (s.end - 1) + " (" + role + "), " + (s.state || "?"),
        },
        el("div", { class: "who" }, s.worker || s.peer_id || "?"),
        el("div", { class: "what" }, "layers " + s.start + "–" + (s.end - 1) + " · " + role),
        ticks));
    });
    if (stages.length > 1) map.append(linkBox(stageLink(stages[stages.length - 1]), "↩"));  // tail -> head: the tokens
    const shardRows = stages.map((s) => el("tr", {},
      el("td", {}, s.index ?? ""), el("td", {}, s.worker || "?"), el("td", {}, s.start + "–" + (s.end - 1)),
      el("td", {}, el("span", { class: "chip " + (s.state || "") }, s.state || "?")),
      el("td", {}, fmtBytes(s.memory)), el("td", {}, fmtBytes(s.bytes_fetched)),
      el("td", { class: "muted" }, s.last_heartbeat_s != null ? s.last_heartbeat_s + " s" : "–"),
      el("td", { class: "muted" }, s.error || "")));
    return el("div", { class: "pipeline" },
      el("div", { class: "pipeline-title" },
        el("strong", {}, d.model || "?"), el("code", { class: "muted" }, d.id || ""),
        el("span", { class: "chip " + (d.state || "") }, d.state || "?"),
        el("span", { class: "muted" }, n + " layers over " + stages.length + " worker" + (stages.length === 1 ? "" : "s")),
        d.note ? el("span", { class: "muted" }, d.note) : null),
      map,
      el("table", { class: "shards" },
        el("thead", {}, el("tr", {}, ...["#", "worker", "layers", "state", "memory", "fetched", "heartbeat", ""].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...shardRows)));
  });
  replace("pipelines", ...blocks);
}

function drawSpark() {
  const c = document.getElementById("spark");
  const g = c.getContext && c.getContext("2d");
  if (!g) return;
  g.clearRect(0, 0, c.width, c.height);
  if (history.length < 2) return;
  const max = Math.max(1, ...history);
  g.strokeStyle = "#4c9be8";
  g.lineWidth = 2;
  g.beginPath();
  history.forEach((v, i) => {
    const x = (i / (history.length - 1)) * (c.width - 2) + 1;
    const y = c.height - 2 - (v / max) * (c.height - 4);
    if (i) g.lineTo(x, y); else g.moveTo(x, y);
  });
  g.stroke();
}

function renderLive(res) {
  if (!res.data) {
    replace("models", unavailable("gateway", res));
    return;
  }
  const d = res.data;
  document.getElementById("tps").textContent = (d.tokens_per_s ?? 0).toFixed(1);
  document.getElementById("active").textContent = d.active_sessions ?? 0;
  document.getElementById("requests").textContent = d.requests_total ?? 0;
  document.getElementById("ttft").textContent = d.ttft_mean_s ? (d.ttft_mean_s * 1000).toFixed(0) + " ms" : "–";
  history.push(d.tokens_per_s || 0);
  if (history.length > 60) history.shift();
  drawSpark();
  const models = d.models || [];
  if (!models.length) { replace("models", el("p", { class: "empty" }, "no model reachable yet")); return; }
  const rows = [];
  for (const m of models) {
    for (const b of m.backends || []) {
      rows.push(el("tr", { class: "backend" },
        el("td", {}, el("strong", {}, m.id)), el("td", {}, b.kind || "?"), el("td", {}, el("code", {}, b.id || "")),
        el("td", {}, el("span", { class: "chip " + (b.healthy === false ? "down" : "ok") }, b.healthy === false ? "down" : "healthy")),
        el("td", {}, b.queue ?? 0),
        el("td", {}, ((d.per_model || {})[m.id] || {}).tokens_per_s?.toFixed(1) ?? "0.0")));
    }
  }
  replace("models", el("table", {},
    el("thead", {}, el("tr", {}, ...["model", "kind", "backend", "health", "queue", "tokens/s"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows)));
}

async function poll() {
  const [node, peers, pipes, live] = await Promise.all([
    getJSON("/api/v1/node"), getJSON("/api/v1/peers"), getJSON("/api/v1/pipeline/status"), getJSON("/api/v1/dashboard"),
  ]);
  for (const [fn, res] of [[renderNode, node], [renderPeers, peers], [renderPipelines, pipes], [renderLive, live]]) {
    try { fn(res); } catch (e) { console.error(e); }
  }
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

document.getElementById("api-url").textContent = location.origin + "/v1";
poll();
setInterval(poll, POLL_MS);
