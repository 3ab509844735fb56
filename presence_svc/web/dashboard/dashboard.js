// The operators' dashboard (presence_svc/web/dashboard.py serves it; README "Dashboard").
// Overview: GET /stats, polled. A study: the browser client (it watches, never joins) and
// GET /presence/{id}/stats. The token comes from the fragment (#token=...) or the paste field,
// stays in this tab's sessionStorage, and leaves the address bar at once.
import { PresenceClient } from "/client/presence.js";

const POLL_MS = 500; // a new study shows within a second
const STUDY_POLL_MS = 1000;
const RATE_POINTS = 120; // one minute of samples
const LOG_LINES = 200;
const TOKEN_KEY = "presence-dashboard-token";
const STATUSES = ["active", "idle", "away"];
const SVG = "http://www.w3.org/2000/svg";

const view = { token: null, study: null, client: null, timer: null, rates: [], generation: 0 };
const $ = (id) => document.getElementById(id);

// --- DOM helpers: text only, never HTML from data -------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) node.append(child ?? "");
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

function statusDot(status) {
  return el("span", { class: `dot st-${status}`, title: status });
}

function clock(value) {
  const date = value ? new Date(value) : new Date();
  return Number.isNaN(date.getTime()) ? "–" : date.toLocaleTimeString([], { hour12: false });
}

function ago(ms) {
  return ms < 1000 ? `${ms} ms ago` : `${(ms / 1000).toFixed(1)} s ago`;
}

function setConn(state, text = state) {
  const pill = $("conn");
  pill.dataset.state = state;
  pill.textContent = text;
}

// --- the token --------------------------------------------------------------------------------

function readFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
  view.token = sessionStorage.getItem(TOKEN_KEY);
  return params.get("study");
}

function showLogin(message = "") {
  stopAll();
  view.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  for (const id of ["overview", "study"]) $(id).hidden = true;
  $("login").hidden = false;
  $("signout").hidden = true;
  $("login-error").textContent = message;
  setConn("closed", "no token");
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${view.token}` },
    cache: "no-store",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body.detail);
  return body;
}

function failed(error) {
  if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
    showLogin(`${error.status}: ${error.message}`);
    return true;
  }
  setConn("down", error instanceof ApiError ? `HTTP ${error.status}` : "unreachable");
  return false;
}

// --- routing ------------------------------------------------------------------------------------

function route() {
  const study = readFragment();
  if (!view.token) return showLogin();
  $("login").hidden = true;
  $("signout").hidden = false;
  stopAll();
  view.generation += 1;
  if (study) showStudy(study, view.generation);
  else showOverview(view.generation);
}

function stopAll() {
  clearTimeout(view.timer);
  view.timer = null;
  if (view.client) view.client.close();
  view.client = null;
}

function crumb(study) {
  const nav = $("crumb");
  nav.replaceChildren();
  if (study) nav.append(el("a", { href: "#" }, "overview"), " / ", el("code", {}, study));
}

function studyLink(study) {
  return el("a", { href: `#study=${encodeURIComponent(study)}` }, study);
}

// --- the overview -----------------------------------------------------------------------------

function showOverview(generation) {
  $("study").hidden = true;
  $("overview").hidden = false;
  crumb(null);
  const poll = async () => {
    try {
      const stats = await api("/stats");
      if (generation !== view.generation) return;
      renderOverview(stats);
      setConn("live", `live · ${clock()}`);
    } catch (error) {
      if (failed(error)) return;
    }
    if (generation === view.generation) view.timer = setTimeout(poll, POLL_MS);
  };
  poll();
}

function renderOverview(stats) {
  $("c-nodes").textContent = stats.nodes.length;
  $("c-sockets").textContent = stats.sockets;
  $("c-watchers").textContent = stats.watchers;
  $("c-studies").textContent = stats.studies;
  $("c-sampled").textContent = stats.exact ? "" : `top of ${stats.sampled} sampled`;
  $("c-sessions").textContent = stats.sessions.total;
  $("c-rate").textContent = stats.events_per_second.toFixed(1);
  renderTop(stats.top_studies);
  renderStatusBar(stats.sessions);
  view.rates.push(stats.events_per_second);
  if (view.rates.length > RATE_POINTS) view.rates.shift();
  renderRate(view.rates);
  renderNodes(stats.nodes, stats.node_id);
}

function statusSummary(users) {
  const parts = STATUSES.filter((s) => users[s]).map((s) => [statusDot(s), ` ${users[s]} ${s}  `]);
  return el("span", { class: "summary" }, ...parts.flat());
}

function renderTop(studies) {
  const rows = studies.map((s) =>
    el("tr", {}, el("td", {}, studyLink(s.study_id)), el("td", { class: "num" }, s.users.total),
      el("td", {}, statusSummary(s.users))),
  );
  $("top").tBodies[0].replaceChildren(...rows);
  $("top-empty").hidden = studies.length > 0;
}

function renderStatusBar(sessions) {
  const bar = $("status-bar");
  const total = Math.max(1, sessions.total);
  let x = 0;
  const parts = [svg("rect", { x: 0, y: 0, width: 400, height: 28, class: "track" })];
  for (const status of STATUSES) {
    const width = (400 * sessions[status]) / total;
    parts.push(svg("rect", { x, y: 0, width, height: 28, class: `fill st-${status}` }));
    x += width;
  }
  bar.replaceChildren(...parts);
  const legend = STATUSES.map((s) => el("li", {}, statusDot(s), ` ${s} `, el("b", {}, sessions[s])));
  $("status-legend").replaceChildren(...legend);
}

function niceMax(value) {
  if (value <= 1) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((m) => m * step).find((m) => m >= value);
}

function renderRate(rates) {
  const [width, height, left, top, bottom] = [400, 130, 34, 8, 18];
  const max = niceMax(Math.max(...rates, 0));
  const plotH = height - top - bottom;
  const xOf = (i) => left + ((width - left - 4) * i) / (RATE_POINTS - 1);
  const yOf = (v) => top + plotH - (plotH * v) / max;
  const offset = RATE_POINTS - rates.length;
  const points = rates.map((v, i) => `${xOf(i + offset).toFixed(1)},${yOf(v).toFixed(1)}`);
  const parts = [];
  for (const v of [0, max / 2, max]) {
    parts.push(svg("line", { x1: left, x2: width - 4, y1: yOf(v), y2: yOf(v), class: "grid" }));
    parts.push(svg("text", { x: left - 4, y: yOf(v) + 4, class: "axis", "text-anchor": "end" },
      Number.isInteger(v) ? String(v) : v.toFixed(1)));
  }
  parts.push(svg("text", { x: left, y: height - 4, class: "axis" }, "−60 s"));
  parts.push(svg("text", { x: width - 4, y: height - 4, class: "axis", "text-anchor": "end" }, "now"));
  if (points.length > 1) {
    const baseline = `${xOf(offset).toFixed(1)},${yOf(0)} `;
    const area = `${baseline}${points.join(" ")} ${xOf(RATE_POINTS - 1).toFixed(1)},${yOf(0)}`;
    parts.push(svg("polygon", { points: area, class: "area" }));
    parts.push(svg("polyline", { points: points.join(" "), class: "line" }));
  }
  $("rate-chart").replaceChildren(...parts);
}

function renderNodes(nodes, answering) {
  const cell = (value, digits = 0) =>
    el("td", { class: "num" }, value === null ? "–" : Number(value).toFixed(digits));
  const rows = nodes.map((n) =>
    el("tr", {},
      el("td", { title: n.node_id }, el("code", {}, n.node_id.slice(0, 12)),
        n.node_id === answering ? el("span", { class: "tag" }, "this page's node") : ""),
      cell(n.sockets), cell(n.watchers), cell(n.studies), cell(n.leases),
      cell(n.events_per_second, 1),
      el("td", { class: "num" }, ago(n.seen_ms_ago))),
  );
  $("nodes").tBodies[0].replaceChildren(...rows);
}

// --- one study ----------------------------------------------------------------------------------

function showStudy(study, generation) {
  $("overview").hidden = true;
  $("study").hidden = false;
  crumb(study);
  $("log").replaceChildren();
  renderUsers([]);
  const client = new PresenceClient({ url: location.origin, studyId: study, token: view.token });
  view.client = client;
  // The first snapshot reports everyone in it as a join: they were there before the page.
  let primed = false;
  client.on("change", (users) => {
    primed = true;
    renderUsers(users);
  });
  client.on("state", (state) => setConn(state === "open" ? "live" : state, `socket ${state}`));
  client.on("join", (u) => (primed ? logLine("join", u) : logLine("here", u, "was here")));
  for (const kind of ["leave", "status", "cursor"]) client.on(kind, (u) => logLine(kind, u));
  client.on("resync", (gap) => logLine("resync", null, `seq gap: ${gap.expected} → ${gap.got}`));
  client.on("error", (error) => logLine("error", null, `${error.code}: ${error.message}`));
  client.connect().catch((error) => {
    if (generation === view.generation && [4401, 4403].includes(error.closeCode)) {
      showLogin(`${error.closeCode}: ${error.message}`);
    }
  });
  const poll = async () => {
    try {
      renderStudyStats(await api(`/presence/${encodeURIComponent(study)}/stats`));
    } catch (error) {
      if (failed(error)) return;
    }
    if (generation === view.generation) view.timer = setTimeout(poll, STUDY_POLL_MS);
  };
  poll();
}

function renderStudyStats(stats) {
  for (const status of STATUSES) $(`s-${status}`).textContent = stats.users[status];
  $("s-watching").textContent = stats.watching;
  $("s-watchers").textContent = stats.watchers;
  $("s-seq").textContent = stats.seq;
}

function renderUsers(users) {
  const order = (u) => STATUSES.indexOf(u.status);
  const sorted = [...users].sort((a, b) => order(a) - order(b) || a.user_id.localeCompare(b.user_id));
  const rows = sorted.map((u) =>
    el("tr", { "data-user": u.user_id, class: `st-row-${u.status}` },
      el("td", {}, statusDot(u.status), ` ${u.status}`),
      el("td", {}, el("b", {}, u.user_id)),
      el("td", {}, u.chapter_id ? el("code", {}, u.chapter_id) : "–"),
      el("td", { class: "path" }, u.move_path ? el("code", {}, u.move_path) : "–"),
      el("td", { class: "num" }, clock(u.last_heartbeat)),
      el("td", { class: "num" }, clock(u.joined_at))),
  );
  $("users").tBodies[0].replaceChildren(...rows);
  $("users-empty").hidden = users.length > 0;
  $("s-client").textContent = `${users.length} present`;
}

function describe(kind, user) {
  if (kind === "status") return `turned ${user.status}`;
  if (kind === "cursor") return `at ${user.chapter_id ?? "–"} · ${user.move_path ?? "–"}`;
  if (kind === "join") return "joined";
  return "left";
}

function logLine(kind, user, text = null) {
  const line = el("li", { class: `ev ev-${kind}` },
    el("time", {}, clock()), el("span", { class: "kind" }, kind),
    user ? el("b", {}, user.user_id) : "", " ", text ?? describe(kind, user));
  const log = $("log");
  log.prepend(line);
  while (log.children.length > LOG_LINES) log.lastElementChild.remove();
}

// --- start ----------------------------------------------------------------------------------------

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token-input").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  route();
});
$("open-study").addEventListener("submit", (event) => {
  event.preventDefault();
  const study = $("open-study-id").value.trim();
  if (study) location.hash = `study=${encodeURIComponent(study)}`;
});
$("signout").addEventListener("click", () => showLogin());
window.addEventListener("hashchange", route);
route();
