// l7lab service map: draws the lab's nodes and edges as SVG and keeps them live.
//
// The server (dataplane/ui/server.py) gives the graph (/api/graph), one edge's recent flows
// (/api/edge) and a stream of changed edges (/api/events, Server-Sent Events). Layout, fixed
// and simple so a node never jumps: namespaces are boxes in a row with their pods on a circle
// inside; DNS servers in a column on the left, world hosts (and addresses nobody in the lab
// has) in a column on the right, the lab node below. Each edge is a <g class="edge"> carrying
// data-from, data-to and data-verdict (its class: the worst of its recent flows). Everything
// the server sends is put on the page as text (textContent), never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 150, NODE_H = 34, PAD = 28, GAP = 40, COLUMN_STEP = 58, EDGE_ROOM = 24;
const CLASS_LABEL = {"forwarded": "forwarded", "audit": "audit", "l7-denied": "L7-denied", "dropped": "dropped"};
const RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"};

const state = {nodes: new Map(), edges: new Map(), selected: null, lab: "", labUp: true};

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function html(name, className, text) {
  const node = document.createElement(name);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const edgeKey = (from, to) => JSON.stringify([from, to]);

// --------------------------------------------------------------------------- layout

function layout(nodes) {
  const pos = new Map();
  const boxes = [];
  const byNamespace = new Map();
  const dns = [], world = [], lab = [];
  for (const n of nodes) {
    if (n.kind === "pod") {
      if (!byNamespace.has(n.namespace)) byNamespace.set(n.namespace, []);
      byNamespace.get(n.namespace).push(n);
    } else if (n.kind === "dns") dns.push(n);
    else if (n.kind === "node") lab.push(n);
    else world.push(n);
  }
  let x = PAD, top = PAD + 18;
  const column = (title, members, cls) => {
    if (!members.length) return;
    const h = members.length * COLUMN_STEP + 2 * PAD - (COLUMN_STEP - NODE_H);
    boxes.push({x, y: top, w: NODE_W + 2 * PAD, h, title, cls});
    members.forEach((n, i) => pos.set(n.id, {x: x + PAD + NODE_W / 2, y: top + PAD + NODE_H / 2 + i * COLUMN_STEP}));
    x += NODE_W + 2 * PAD + GAP;
  };
  column("DNS", dns.sort(byId), "dns");
  let bottom = top;
  for (const [namespace, pods] of [...byNamespace.entries()].sort()) {
    pods.sort(byId);
    // Pods on a circle, from the top left: two side by side, three a triangle, four a square;
    // the box is as large as the pods' extent, with room for the edges that curve between them.
    const r = pods.length < 2 ? 0 : Math.max(110, pods.length * 36);
    const spots = pods.map((n, i) => {
      const a = -Math.PI / 2 - Math.PI / pods.length + (2 * Math.PI * i) / pods.length;
      return {x: r * Math.cos(a), y: r * Math.sin(a)};
    });
    const minX = Math.min(...spots.map((s) => s.x)), maxX = Math.max(...spots.map((s) => s.x));
    const minY = Math.min(...spots.map((s) => s.y)), maxY = Math.max(...spots.map((s) => s.y));
    const w = maxX - minX + NODE_W + 2 * PAD, h = maxY - minY + NODE_H + 2 * PAD + 2 * EDGE_ROOM;
    boxes.push({x, y: top, w, h, title: `namespace ${namespace}`, cls: "namespace"});
    pods.forEach((n, i) => pos.set(n.id, {x: x + PAD + NODE_W / 2 + spots[i].x - minX,
                                          y: top + PAD + EDGE_ROOM + NODE_H / 2 + spots[i].y - minY}));
    x += w + GAP;
    bottom = Math.max(bottom, top + h);
  }
  column("world", world.sort(byId), "world");
  for (const b of boxes) bottom = Math.max(bottom, b.y + b.h);
  lab.forEach((n, i) => pos.set(n.id, {x: Math.max(x / 2, PAD + NODE_W), y: bottom + GAP + NODE_H / 2 + i * COLUMN_STEP}));
  const height = bottom + GAP + lab.length * COLUMN_STEP + PAD;
  return {pos, boxes, width: Math.max(x, 2 * PAD + NODE_W * 2), height};
}

function byId(a, b) { return a.id < b.id ? -1 : a.id > b.id ? 1 : 0; }

// Where a line from a node's centre towards `toward` leaves its rectangle.
function border(c, toward) {
  const dx = toward.x - c.x, dy = toward.y - c.y;
  if (!dx && !dy) return {x: c.x, y: c.y};
  const s = Math.min(dx ? (NODE_W / 2 + 2) / Math.abs(dx) : Infinity, dy ? (NODE_H / 2 + 2) / Math.abs(dy) : Infinity);
  return {x: c.x + dx * s, y: c.y + dy * s};
}

// A curved edge: the two directions of one pair bend to opposite sides, so both stay visible.
function edgeGeometry(a, b) {
  if (a === b) {  // a node talking to itself: a loop above it
    const s = {x: a.x - 20, y: a.y - NODE_H / 2}, e = {x: a.x + 20, y: a.y - NODE_H / 2};
    return {d: `M${s.x},${s.y} C${s.x - 10},${s.y - 50} ${e.x + 10},${e.y - 50} ${e.x},${e.y}`, mid: {x: a.x, y: a.y - NODE_H / 2 - 38}};
  }
  const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy);
  const bend = Math.max(40, 0.22 * len);
  const c = {x: (a.x + b.x) / 2 - (dy / len) * bend, y: (a.y + b.y) / 2 + (dx / len) * bend};
  const s = border(a, c), e = border(b, c);
  const mid = {x: 0.25 * s.x + 0.5 * c.x + 0.25 * e.x, y: 0.25 * s.y + 0.5 * c.y + 0.25 * e.y};
  return {d: `M${s.x},${s.y} Q${c.x},${c.y} ${e.x},${e.y}`, mid};
}

// --------------------------------------------------------------------------- drawing

function render() {
  const svg = document.getElementById("map");
  const nodes = [...state.nodes.values()];
  const {pos, boxes, width, height} = layout(nodes);
  svg.replaceChildren();
  // The whole map fits the area beside the panel (scaled down, never up past 1:1).
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.style.maxWidth = `${width}px`;
  svg.style.maxHeight = `${height}px`;

  const defs = el("defs");
  for (const cls of Object.keys(CLASS_LABEL)) {
    const marker = el("marker", {id: `arrow-${cls}`, class: cls, viewBox: "0 0 10 10", refX: 9, refY: 5,
      markerUnits: "userSpaceOnUse", markerWidth: 12, markerHeight: 12, orient: "auto-start-reverse"});
    marker.append(el("path", {d: "M0,0 L10,5 L0,10 z"}));
    defs.append(marker);
  }
  svg.append(defs);

  const boxLayer = el("g", {class: "boxes"});
  for (const b of boxes) {
    boxLayer.append(el("rect", {class: `ns-box ${b.cls}`, x: b.x, y: b.y, width: b.w, height: b.h, rx: 10}));
    boxLayer.append(el("text", {class: "ns-title", x: b.x + 10, y: b.y - 6}, b.title));
  }
  svg.append(boxLayer);

  const edgeLayer = el("g", {class: "edges"});
  const badgeLayer = el("g", {class: "edge-badges"});
  const edges = [...state.edges.values()].sort((p, q) => (p.from + p.to < q.from + q.to ? -1 : 1));
  for (const edge of edges) {
    const a = pos.get(edge.from), b = pos.get(edge.to);
    if (!a || !b) continue;
    const {d, mid} = edgeGeometry(a, b);
    const total = Object.values(edge.counts).reduce((s, v) => s + v, 0);
    const g = el("g", {class: "edge", "data-from": edge.from, "data-to": edge.to, "data-verdict": edge.verdict,
      tabindex: 0, role: "button"});
    const selected = state.selected === edgeKey(edge.from, edge.to);
    if (selected) g.classList.add("selected");
    const title = el("title", {}, `${edge.from} → ${edge.to}: ${CLASS_LABEL[edge.verdict]} (` +
      Object.entries(edge.counts).filter(([, v]) => v).map(([k, v]) => `${CLASS_LABEL[k]} ${v}`).join(", ") + ")" +
      (edge.proxy_upstream_for.length ? `\nL7 proxy upstream on behalf of ${edge.proxy_upstream_for.join(", ")}` : ""));
    g.append(title);
    g.append(el("path", {class: "hit", d}));
    g.append(el("path", {class: "line", d, "marker-end": `url(#arrow-${edge.verdict})`}));
    g.addEventListener("click", () => select(edge.from, edge.to));
    g.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") select(edge.from, edge.to); });
    edgeLayer.append(g);
    // The edge's count, at the middle of its curve, in a layer above every line so no other
    // edge covers it: the surest place to click an edge.
    const badge = el("g", {class: "edge-badge", "data-from": edge.from, "data-to": edge.to, "data-verdict": edge.verdict});
    badge.append(el("title", {}, title.textContent));
    badge.append(el("circle", {cx: mid.x, cy: mid.y, r: 10}));
    badge.append(el("text", {x: mid.x, y: mid.y}, total > 999 ? "1k+" : String(total)));
    if (selected) badge.classList.add("selected");
    badge.addEventListener("click", () => select(edge.from, edge.to));
    badgeLayer.append(badge);
  }

  const nodeLayer = el("g", {class: "nodes"});
  for (const n of nodes) {
    const p = pos.get(n.id);
    const g = el("g", {class: "node", "data-id": n.id, "data-kind": n.kind});
    g.append(el("title", {}, [n.id, n.ip, ...Object.entries(n.labels).map(([k, v]) => `${k}=${v}`)].filter(Boolean).join("\n")));
    g.append(el("rect", {x: p.x - NODE_W / 2, y: p.y - NODE_H / 2, width: NODE_W, height: NODE_H, rx: 8}));
    g.append(el("text", {x: p.x, y: p.y - 6}, n.name));
    g.append(el("text", {class: "sub", x: p.x, y: p.y + 9}, n.kind === "pod" ? n.ip : [n.kind, n.ip].filter(Boolean).join(" ")));
    nodeLayer.append(g);
  }
  // Nodes under edges would hide the arrows' heads; edges go last so every edge stays clickable.
  svg.append(nodeLayer, edgeLayer, badgeLayer);
  document.getElementById("empty").hidden = state.edges.size > 0;
}

// --------------------------------------------------------------------------- the side panel

function formatTime(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], {hour12: false}) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function requestText(f) {
  if (f.http) {
    const answer = f.http.code ? ` → ${f.http.code}` : " → no answer";
    return `${f.http.method || "?"} ${f.http.path || f.http.url}${answer}`;
  }
  if (f.dns) {
    const rcode = f.dns.rcode < 0 ? "no answer" : `${RCODES[f.dns.rcode] || "RCODE " + f.dns.rcode} (${f.dns.rcode})`;
    return `DNS ${f.dns.query ? `${f.dns.qtypes.join(",")} ${f.dns.query}` : "(not a DNS query)"} → ${rcode}`;
  }
  return `${f.protocol}${f.port ? " :" + f.port : ""}`;
}

// Cilium's label-set identities (pods): 256 up to the CIDR identities at 2^24.
const isPodIdentity = (identity) => identity >= 256 && identity < 2 ** 24;

function verdictText(f) {
  if (f.type === "L7") return `L7 ${f.verdict}`;
  return f.drop_reason ? `${f.verdict} ${f.drop_reason}` : f.verdict;
}

function showDetail(detail) {
  const panel = document.getElementById("detail");
  panel.hidden = false;
  panel.dataset.from = detail.from;
  panel.dataset.to = detail.to;
  panel.dataset.verdict = detail.verdict;
  document.getElementById("detail-title").textContent = `${detail.from} → ${detail.to}`;
  const summary = document.getElementById("detail-summary");
  summary.replaceChildren(html("span", `tag ${detail.verdict}`, CLASS_LABEL[detail.verdict]), " ",
    Object.entries(detail.counts).map(([k, v]) => `${CLASS_LABEL[k]} ${v}`).join(" · ") +
    (detail.ports.length ? ` · port ${detail.ports.join(", ")}` : "") + ` · the last ${detail.flows.length} flows, newest first`);
  // The node's connections that carry a pod's identity are the L7 proxy's, made for that pod.
  const note = document.getElementById("detail-note");
  note.hidden = !detail.proxy_upstream_for.length;
  note.textContent = detail.proxy_upstream_for.length ?
    `L7 proxy upstream on behalf of ${detail.proxy_upstream_for.join(", ")}: the proxy in the lab node's stack ` +
    "forwards the requests it allowed; the datapath passes its connections without a policy lookup" : "";
  const body = document.querySelector("#detail-flows tbody");
  body.replaceChildren();
  for (const f of detail.flows) {
    const row = html("tr", "flow");
    row.dataset.verdict = f.class;
    row.append(html("td", "time", formatTime(f.time)));
    const verdict = html("td", "verdict");
    verdict.append(html("span", `tag ${f.class}`, verdictText(f)));
    if (f.direction) verdict.append(" ", html("span", "direction", f.direction));
    row.append(verdict, html("td", "request", requestText(f)));
    const policy = html("td", "policy");
    if (f.isolated_by.length) {
      // A default deny: no rule allows it, where these policies make the pod enforce the direction.
      policy.append(html("div", "isolated-by", `default deny: isolated by ${f.isolated_by.join(", ")}`));
    } else if (detail.from === "node" && isPodIdentity(f.source_identity) && !f.policies.length) {
      policy.append(html("div", "", "none looked up: the L7 proxy's own connection"));
    } else if (!f.policies.length && !f.rules.length) {
      policy.append(html("div", "", f.drop_reason === "POLICY_DENIED" ? "no rule allows it (default deny)" : "—"));
    }
    // A rule names its policy ("Kind ns/name ingress[0]"): a policy is listed alone only when
    // no rule of it is (a denied request names the policies whose rules it failed).
    for (const p of f.policies.filter((p) => !f.rules.some((r) => r.startsWith(p + " ")))) {
      policy.append(html("div", "policy-name", p));
    }
    for (const r of f.rules) policy.append(html("div", "rule", r));
    if (f.type === "L7" && f.summary) policy.append(html("div", "why", f.summary));  // the proxy's reason, in words
    row.append(policy);
    body.append(row);
  }
}

async function loadDetail() {
  if (!state.selected) return;
  const [from, to] = JSON.parse(state.selected);
  const resp = await fetch(`/api/edge?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`);
  if (resp.ok && state.selected === edgeKey(from, to)) showDetail(await resp.json());
}

function select(from, to) {
  state.selected = edgeKey(from, to);
  for (const g of document.querySelectorAll("g.edge, g.edge-badge")) {
    g.classList.toggle("selected", g.dataset.from === from && g.dataset.to === to);
  }
  loadDetail();
}

// --------------------------------------------------------------------------- live data

function setStatus(text, stateName) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.dataset.state = stateName;
}

function liveStatus() {
  setStatus(state.labUp ? "live" : "the lab is down (showing its last flows)", state.labUp ? "live" : "down");
}

async function loadGraph() {
  const resp = await fetch("/api/graph");
  if (!resp.ok) return;
  const graph = await resp.json();
  state.lab = graph.lab;
  state.labUp = graph.lab_up;
  document.getElementById("lab").textContent = `lab ${graph.lab}`;
  state.nodes = new Map(graph.nodes.map((n) => [n.id, n]));
  state.edges = new Map(graph.edges.map((e) => [edgeKey(e.from, e.to), e]));
  render();
  liveStatus();
  loadDetail();
}

function applyUpdate(update) {
  if (update.resync) { loadGraph(); return; }
  if (update.lab_up !== undefined) { state.labUp = update.lab_up; liveStatus(); }
  for (const n of update.nodes || []) state.nodes.set(n.id, n);
  let selectedChanged = false;
  for (const e of update.edges || []) {
    const key = edgeKey(e.from, e.to);
    state.edges.set(key, e);
    selectedChanged ||= key === state.selected;
  }
  if ((update.edges || []).length) render();
  if (selectedChanged) loadDetail();
}

function connect() {
  const source = new EventSource("/api/events");
  source.onopen = () => loadGraph();  // at first and after every reconnection: start from the whole graph
  source.onmessage = (ev) => applyUpdate(JSON.parse(ev.data));
  source.onerror = () => setStatus("reconnecting…", "offline");
}

document.getElementById("close-detail").addEventListener("click", () => {
  state.selected = null;
  document.getElementById("detail").hidden = true;
  for (const g of document.querySelectorAll(".selected")) g.classList.remove("selected");
});
connect();
