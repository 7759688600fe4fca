// Operations status page: signs in with an API token (ops or admin), polls
// /api/ops/summary and draws the figures and small SVG bar charts. No external
// resources; every value is written with textContent.
"use strict";

const TOKEN_KEY = "triage.token";
const REFRESH_MS = 30000;
const SVG_NS = "http://www.w3.org/2000/svg";
let timer = null;

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${token()}` },
    cache: "no-store",
  });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const error = new Error((body && body.detail) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---- formatting -----------------------------------------------------------------

function count(value) {
  return value === null || value === undefined ? "–" : Number(value).toLocaleString();
}

function percent(value, digits = 1) {
  return value === null || value === undefined ? "–" : `${(100 * value).toFixed(digits)} %`;
}

function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = value;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function when(unix) {
  if (!unix) return "–";
  return new Date(unix * 1000).toLocaleString();
}

function ago(unix, now) {
  return unix ? `${duration(now - unix)} ago` : "–";
}

// ---- rendering ------------------------------------------------------------------

function set(key, text, level) {
  for (const el of document.querySelectorAll(`[data-k="${key}"]`)) {
    el.textContent = text;
    el.classList.remove("warn", "bad", "good");
    if (level) el.classList.add(level);
  }
}

function tags(listId, entries, empty) {
  const list = $(listId);
  list.replaceChildren();
  if (!entries.length) {
    const item = document.createElement("li");
    item.className = "muted";
    item.textContent = empty;
    list.append(item);
    return;
  }
  for (const [name, value] of entries) {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = name;
    const number = document.createElement("b");
    number.textContent = count(value);
    item.append(label, number);
    list.append(item);
  }
}

function definitions(listId, entries) {
  const list = $(listId);
  list.replaceChildren();
  for (const [name, value] of entries) {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = count(value);
    list.append(term, detail);
  }
}

function svg(name, attributes) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, value);
  return el;
}

// Bars of `total` per hour with the `part` of each bar drawn on top in a second colour.
function barChart(figureId, hours, total, part, partName) {
  const figure = $(figureId);
  figure.querySelector("svg")?.remove();
  const width = 360;
  const height = 120;
  const pad = { left: 28, right: 4, top: 8, bottom: 18 };
  const max = Math.max(1, ...total);
  const step = (width - pad.left - pad.right) / total.length;
  const scale = (v) => ((height - pad.top - pad.bottom) * v) / max;
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": figure.querySelector("figcaption").textContent,
  });
  const base = height - pad.bottom;
  chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: base, y2: base,
                             class: "axis" }));
  for (const tick of [0, max]) {
    const label = svg("text", { x: pad.left - 4, y: base - scale(tick) + 3, class: "tick",
                                "text-anchor": "end" });
    label.textContent = count(tick);
    chart.append(label);
  }
  total.forEach((value, i) => {
    const x = pad.left + i * step + 1;
    const bar = svg("rect", { x, y: base - scale(value), width: Math.max(1, step - 2),
                              height: scale(value), class: "bar" });
    const hour = new Date(hours[i] * 1000);
    const title = svg("title", {});
    const stamp = hour.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    title.textContent = `${stamp}: ${value}` + (part ? `, ${part[i]} ${partName}` : "");
    bar.append(title);
    chart.append(bar);
    if (part && part[i]) {
      chart.append(svg("rect", { x, y: base - scale(part[i]), width: Math.max(1, step - 2),
                                 height: scale(part[i]), class: "bar part" }));
    }
    if (i % 6 === 0) {
      const label = svg("text", { x: x + step / 2, y: height - 4, class: "tick",
                                  "text-anchor": "middle" });
      label.textContent = `${String(hour.getHours()).padStart(2, "0")}h`;
      chart.append(label);
    }
  });
  figure.append(chart);
}

// The DICOM node card: configuration, live counters (since the daemon started) and the
// last day's arrivals. AE titles come from senders: written as text only.
function renderDicom(d, now) {
  if (!d) return;
  const where = `${d.host}:${d.port}`;
  set("dicom_listening", !d.enabled ? "off (dicom.port not set)"
    : d.listening ? where : `not listening (${where})`,
      !d.enabled ? "" : d.listening ? "good" : "bad");
  set("dicom_ae_title", d.ae_title);
  set("dicom_allowed_ae", d.allowed_calling_ae_titles.length
    ? d.allowed_calling_ae_titles.join(", ") : "any");
  // Any host may send to a node bound beyond loopback: worth a glance (amber), not an alarm.
  const open = d.enabled && !d.allowed_hosts.length && !/^(127\.|::1$|localhost$)/.test(d.host);
  set("dicom_allowed_hosts", d.allowed_hosts.length ? d.allowed_hosts.join(", ") : "any",
      open ? "warn" : "");
  set("dicom_active", d.active_associations === null || d.active_associations === undefined
    ? "–" : `${count(d.active_associations)} of ${count(d.max_associations)}`);
  set("dicom_received_24h", count(d.received_24h));
  set("dicom_last_received", d.last_received_at ? ago(d.last_received_at, now) : "–");
  tags("dicom-associations", Object.entries(d.associations || {}), "none");
  tags("dicom-instances", Object.entries(d.instances || {}), "none");
  tags("dicom-senders", Object.entries(d.senders_24h).map(([k, v]) => [k || "(none)", v]),
       "none");
}

function flag(text, level) {
  const item = document.createElement("p");
  item.className = `flag ${level}`;
  item.textContent = text;
  $("flags").append(item);
}

function render(s) {
  const now = s.generated_at;
  $("flags").replaceChildren();

  set("inbox_pending", count(s.inbox_pending));
  const paused = s.disk.ingest_paused;
  set("ingest_state", paused ? "paused (disk low)" : paused === false ? "running" : "–",
      paused ? "bad" : "good");
  for (const state of ["archived", "unsupported", "out_of_scope", "quarantined", "duplicate",
                       "vanished", "in_flight"]) {
    set(`files.${state}`, count(s.files[state]));
  }
  tags("quarantine", Object.entries(s.quarantine), "none");
  definitions("studies", Object.entries(s.studies));
  renderDicom(s.dicom, now);

  // Like the TriageRoutedFractionOffTarget alert: only with a serving model (cold start
  // routes everything up to the cap) and enough decisions; the gate's window and
  // threshold mean nothing before that.
  const target = s.gate.label_rate_target;
  const scoring = Boolean(s.model.serving_version);
  const off = (f) => scoring && s.decisions_24h.total >= 50 && f !== null &&
    Math.abs(f - target) > target / 2;
  set("routed_fraction", scoring ? percent(s.gate.routed_fraction) : "– (cold start)",
      off(s.gate.routed_fraction) ? "warn" : "");
  set("routed_fraction_24h", percent(s.gate.routed_fraction_24h),
      off(s.gate.routed_fraction_24h) ? "warn" : "");
  set("label_rate_target", percent(target));
  // under `auto`, the mix the gate draws its candidates from (learnt from the audits)
  const mix = s.gate.auto_mix;
  set("strategy", mix ? `auto: ${Object.entries(mix).map(([k, v]) => `${k} ${percent(v, 0)}`)
    .join(", ")}` : s.gate.strategy);
  set("threshold", scoring && s.gate.threshold !== null ? s.gate.threshold.toFixed(3) : "–");
  set("decisions_total",
      `${count(s.decisions_24h.total)} (${count(s.decisions_24h.routed)} routed)`);
  tags("reasons", Object.entries(s.decisions_24h.by_reason), "no decisions");

  set("queue.pending", count(s.queue.pending));
  set("queue.claimed", count(s.queue.claimed));
  set("queue.labeled", count(s.queue.labeled));
  const oldest = s.queue.oldest_pending_seconds;
  set("oldest_pending", s.queue.pending ? duration(oldest) : "–",
      oldest > 86400 ? "bad" : oldest > 14400 ? "warn" : "");

  const m = s.model;
  // the version the scorer actually serves; the registry's beside it when they differ
  // (its checkpoint cannot be loaded: an older version serves, or none and studies wait)
  const differs = m.serving_version !== m.registry_version;
  set("serving_version", m.serving_version ||
      (!m.registry_version ? "none (cold start)"
        : m.serving ? "none loads (studies wait)" : "not loaded yet"),
      m.serving_version && !differs ? "" : differs && m.serving ? "bad" : "warn");
  set("registry_version", m.registry_version || "none", "warn");
  for (const el of document.querySelectorAll(".registry-row")) el.hidden = !differs;
  set("promoted_at", m.promoted_at ? ago(m.promoted_at, now) : "–");
  set("validation_auroc", m.validation_auroc === null ? "–" : m.validation_auroc.toFixed(3));
  const point = m.operating_point;
  set("operating_point", !point ? "–"
    : `${point.threshold === null ? "argmax" : `threshold ${point.threshold.toFixed(3)}`}, ` +
      `temperature ${point.temperature.toFixed(2)}`);
  set("audit_accuracy", m.audit_samples
    ? `${percent(m.audit_accuracy)} (n = ${count(m.audit_samples)})` : "no audited labels yet");

  const r = s.retrain;
  const run = r.last_run;
  set("retrain_state", run
    ? (r.running ? `running ${percent(run.progress, 0)}` : `${run.state} (${run.trigger})`)
    : (r.enabled ? "none yet" : "disabled"), run && run.state === "failed" ? "bad" : "");
  set("retrain_started", run ? ago(run.started_at, now) : "–");
  set("retrain_message", run && run.message ? run.message : "–");
  set("labels_since", count(r.labels_since_last_run));

  // replicas sharing the store (one row with a single daemon)
  const reps = s.replicas;
  const silent = reps.members.filter((x) => !x.live && !x.stopped);
  set("retrain_lease", reps.retrain_lease || "no replica holds the lease");
  set("replicas", reps.members.filter((x) => x.live).map((x) =>
    `${x.name}${x.name === reps.this ? " (this)" : ""}: ${x.roles.join(", ")}`).join("; ")
    || "–");
  for (const x of silent) {
    flag(`Replica ${x.name} (${x.host}) has sent no heartbeat for ` +
         `${duration(x.last_heartbeat_seconds)}: what it was scoring is scored by others; ` +
         "restart it, or stop it cleanly to retire it.", "warn");
  }

  const d = s.disk;
  set("disk_free", `${bytes(d.free_bytes)} of ${bytes(d.total_bytes)}`,
      d.free_bytes < d.min_free_bytes * 2 ? "warn" : "");
  set("disk_floor", bytes(d.min_free_bytes));
  $("disk-bar").style.width = `${Math.min(100, (100 * d.free_bytes) / d.total_bytes)}%`;

  if (paused) flag("Ingestion is paused: free disk space is below the floor.", "bad");
  const refused = s.dicom && s.dicom.instances ? s.dicom.instances.out_of_resources || 0 : 0;
  if (refused) {
    flag(`The DICOM node refused ${count(refused)} instance(s) for lack of resources ` +
         "(disk or database) since the daemon started; senders retry them.", "warn");
  }
  if (s.queue.pending && oldest > 86400) {
    flag(`The oldest pending study has waited ${duration(oldest)}.`, "warn");
  }
  if (run && run.state === "failed") flag(`The last retrain failed: ${run.message || ""}`, "bad");
  const sv = m.serving;
  if (sv && !sv.ok) {
    flag(`Model degraded: serving ${sv.served_version || "nothing (studies wait)"} instead ` +
         `of ${sv.registry_version}: ${sv.detail || sv.reason || ""}`, "bad");
  }
  if (off(s.gate.routed_fraction)) {
    flag(`The gate routes ${percent(s.gate.routed_fraction)} against a target of ` +
         `${percent(target)}.`, "warn");
  }

  const h = s.series;
  barChart("chart-files", h.hour_starts,
           h.files_ingested.map((v, i) => v + h.files_quarantined[i]),
           h.files_quarantined, "quarantined");
  barChart("chart-decisions", h.hour_starts, h.decisions, h.decisions_routed, "routed");
  barChart("chart-labels", h.hour_starts, h.labels, null, "");
  $("updated").textContent = `updated ${new Date(now * 1000).toLocaleTimeString()}`;
}

// ---- flow -----------------------------------------------------------------------

function showSignIn(message) {
  clearInterval(timer);
  timer = null;
  $("dashboard").hidden = true;
  $("who").hidden = true;
  $("error").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("token").focus();
}

async function refresh() {
  try {
    const summary = await api("/api/ops/summary");
    $("error").hidden = true;
    $("dashboard").hidden = false;
    document.body.dataset.loaded = "true";
    render(summary);
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignIn(error.message);
      return;
    }
    $("error").textContent = `Could not load the summary: ${error.message}`;
    $("error").hidden = false;
  }
}

async function start() {
  try {
    const me = await api("/api/me");
    if (me.role !== "ops" && me.role !== "admin") {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignIn(`This page needs the role ops or admin; the token has ${me.role}.`);
      return;
    }
    $("who-name").textContent = `${me.name} (${me.role})`;
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn(error.message);
    return;
  }
  $("sign-in").hidden = true;
  $("who").hidden = false;
  await refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn("");
  });
  $("refresh").addEventListener("click", refresh);
  if (token()) start();
  else showSignIn("");
});
