// The review queue in the browser: sign in, next study, image with window/level, label.
// Plain JavaScript, no build step, no network beyond this server.
"use strict";

const TOKEN_KEY = "triage.token";
const PRESETS = {
  CT: [["Lung", -600, 1500], ["Mediastinum", 40, 400], ["Bone", 400, 1800], ["Brain", 40, 80]],
  MR: [],
};
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  config: null,
  study: null,        // GET /api/studies/{id}
  leaseUntil: 0,      // epoch seconds
  instance: 0,
  frame: 0,
  window: null,       // [centre, width] or null for the server's default
  inverted: false,
  labeled: false,
  busy: false,
};

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) },
  });
  if (response.status === 204) return null;
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, detail);
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? response.json() : response.blob();
}

function show(section) {
  for (const id of ["signin", "empty", "reader"]) $(id).hidden = id !== section;
  $("session").hidden = section === "signin";
}

function toast(text) {
  const box = $("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 2500);
}

function formatSeconds(seconds) {
  if (seconds == null) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

// -- session ------------------------------------------------------------------------------

async function signIn(token) {
  state.token = token;
  try {
    const me = await api("/api/me");
    state.config = await api("/api/config");
    sessionStorage.setItem(TOKEN_KEY, token);
    $("who").textContent = `${me.name} · ${me.role}`;
    $("status-link").hidden = !["ops", "admin"].includes(me.role);
    renderTally(me.tally);
    buildLabelButtons();
    if (!["radiologist", "admin"].includes(me.role)) {
      show("empty");
      $("empty").querySelector("h1").textContent = "This token cannot read studies";
      $("empty").querySelector("p").textContent =
        `Your role is ${me.role}; the review queue needs a radiologist token.`;
      return;
    }
    await nextStudy();
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    show("signin");
    $("signin-error").textContent = error.status === 401
      ? `Sign-in refused: ${error.message}.` : `Sign-in failed: ${error.message}`;
  }
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.study = null;
  $("token").value = "";
  show("signin");
}

async function refreshTally() {
  try { renderTally((await api("/api/me")).tally); } catch (_) { /* keep the old tally */ }
}

function renderTally(tally) {
  $("tally").textContent =
    `Today: ${tally.labeled_today} labeled · median ${formatSeconds(tally.median_seconds)}`;
}

// -- queue --------------------------------------------------------------------------------

async function nextStudy() {
  if (state.busy) return;
  state.busy = true;
  try {
    const claim = await api("/api/queue/next", { method: "POST" });
    if (claim === null) {
      state.study = null;
      show("empty");
      return;
    }
    state.leaseUntil = claim.lease_expires_at;
    state.study = await api(`/api/studies/${claim.study_id}`);
    state.instance = 0;
    state.frame = 0;
    state.window = null;
    state.inverted = false;
    state.labeled = false;
    $("comment").value = "";
    $("label-error").textContent = "";
    show("reader");
    renderStudy();
    loadViewerLink(claim.study_id);
    await loadImage();
  } catch (error) {
    handleError(error);
  } finally {
    state.busy = false;
  }
}

async function submitLabel(value) {
  if (!state.study || state.labeled) return;
  if (state.busy) {  // the study is still loading: say so rather than drop the key
    toast("Still loading this study: press again in a moment");
    return;
  }
  state.busy = true;
  const id = state.study.study_id;
  try {
    await api(`/api/studies/${id}/label`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ label: value, comment: $("comment").value.trim() || null }),
    });
    state.labeled = true;
    toast(`Study ${id}: ${value}`);
    refreshTally();
  } catch (error) {
    $("label-error").textContent = error.message;
    return;
  } finally {
    state.busy = false;
  }
  await nextStudy();
}

function handleError(error) {
  if (error.status === 401) {
    signOut();
    $("signin-error").textContent = `Signed out: ${error.message}.`;
  } else {
    toast(error.message);
  }
}

// -- rendering ----------------------------------------------------------------------------

function buildLabelButtons() {
  const box = $("labels");
  box.textContent = "";
  const add = (value, key, cls) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `label ${cls}`;
    button.dataset.label = value;
    button.append(document.createTextNode(value.replace("-", " ")));
    const kbd = document.createElement("kbd");
    kbd.textContent = key;
    button.append(kbd);
    button.addEventListener("click", () => submitLabel(value));
    box.append(button);
  };
  state.config.labels.forEach((value, index) => add(value, String(index + 1), "class"));
  add("skip", "s", "other");
  add("not-diagnostic", "d", "other");
}

function operatingPointText(point, names) {
  if (!point) return "";
  const temperature = `temperature ${Number(point.temperature).toFixed(2)}`;
  if (point.threshold == null || names.length !== 2) return `argmax of the probabilities, ${temperature}`;
  return `${names[1]} when its probability ≥ ${(100 * point.threshold).toFixed(0)} % ` +
    `(threshold ${Number(point.threshold).toFixed(3)}), ${temperature}`;
}

function renderStudy() {
  const study = state.study;
  const why = study.why;
  $("why-text").textContent = why.explanation;
  const numbers = $("why-numbers");
  numbers.textContent = "";
  const row = (term, value) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    numbers.append(dt, dd);
  };
  row("reason", why.reason);
  if (why.combined != null) row("score / threshold", `${why.combined.toFixed(2)} / ${why.threshold.toFixed(2)}`);
  if (why.quantiles) {
    for (const [name, q] of Object.entries(why.quantiles)) row(`${name} quantile`, q.toFixed(2));
  }
  row("model", why.model_version || "none yet");
  if (why.expert) row("ranked by", `${why.expert} (gate strategy auto)`);
  // once a label trained a model: how often its images were forgotten in training
  const forgetting = study.forgetting;
  if (forgetting) {
    const runs = `${forgetting.trainings} training${forgetting.trainings === 1 ? "" : "s"}`;
    const never = forgetting.never_learned ? `, never learned in ${forgetting.never_learned}` : "";
    row("forgotten in training", `${forgetting.events}× over ${runs}${never}`);
  }
  const prediction = study.prediction;
  $("prediction-card").hidden = !(state.config.show_prediction && prediction);
  if (prediction) {
    // the label stored with the decision, at the model's operating point: with a
    // threshold it can differ from the larger of the (calibrated) probabilities
    const names = Object.keys(prediction.probabilities);
    const p = Object.entries(prediction.probabilities)
      .map(([name, value]) => `${name} ${(100 * value).toFixed(0)} %`).join(" · ");
    $("prediction").textContent = `${prediction.label} (${p})`;
    $("operating-point").textContent = operatingPointText(prediction.operating_point, names);
  }
  $("patient-card").hidden = !(state.config.show_phi && study.patient);
  if (study.patient) {
    const dl = $("patient");
    dl.textContent = "";
    for (const [key, value] of Object.entries(study.patient)) {
      const dt = document.createElement("dt");
      dt.textContent = key.replace(/([a-z])([A-Z])/g, "$1 $2");
      const dd = document.createElement("dd");
      dd.textContent = value || "–";
      dl.append(dt, dd);
    }
  }
  // descriptions (like the patient's name above) are the sender's text: only ever
  // textContent, never innerHTML, so markup in a header is shown, not run
  $("ov-study").textContent = [`study ${study.study_id}`, study.modalities.join(", "),
    study.description].filter(Boolean).join(" · ");
  const presets = $("presets");
  presets.textContent = "";
  const modality = study.modalities[0];
  for (const [name, centre, width] of PRESETS[modality] || []) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = name;
    button.addEventListener("click", () => setWindow([centre, width]));
    presets.append(button);
  }
}

// "Open in viewer": the study in the viewer that review.viewer_url names; without one,
// the study's DICOMweb URL (as text) for whoever opens it in a DICOMweb viewer.
async function loadViewerLink(studyId) {
  const link = $("viewer-link");
  const plain = $("dicomweb-url");
  link.hidden = true;
  plain.hidden = true;
  let target;
  try {
    target = await api(`/api/studies/${studyId}/viewer`);
  } catch (_) {
    return;  // the reading goes on without it
  }
  if (!state.study || state.study.study_id !== studyId) return;  // moved on meanwhile
  if (target.viewer_url) {
    link.href = target.viewer_url;
    link.hidden = false;
  } else {
    plain.textContent = `DICOMweb: ${target.dicomweb_url}`;
    plain.hidden = false;
  }
}

function currentImage() {
  return state.study.images[state.instance];
}

function renderPosition() {
  const image = currentImage();
  const total = state.study.images.length;
  $("ov-pos").textContent = [image.series_description,
    `image ${state.instance + 1}/${total} · frame ${state.frame + 1}/${image.frames}`]
    .filter(Boolean).join(" · ");
  $("nav-label").textContent = `${state.instance + 1}/${total} · ${state.frame + 1}/${image.frames}`;
  const window = state.window || image.window;
  $("ov-wl").textContent = window
    ? `W ${Math.round(window[1])}  L ${Math.round(window[0])}` : "auto window";
  if (window) {
    $("ww").value = Math.round(window[1]);
    $("wc").value = Math.round(window[0]);
  }
}

async function loadImage() {
  if (!state.study || !state.study.images.length) return;
  const image = currentImage();
  let path = `/api/studies/${state.study.study_id}/images/${image.instance_id}/${state.frame}.png`;
  if (state.window) path += `?wc=${state.window[0]}&ww=${state.window[1]}`;
  const ticket = (loadImage.ticket = (loadImage.ticket || 0) + 1);
  $("loading").hidden = false;
  try {
    const blob = await api(path);
    if (ticket !== loadImage.ticket) return;  // a newer request won
    const img = $("image");
    if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
    img.dataset.url = URL.createObjectURL(blob);
    img.src = img.dataset.url;
  } catch (error) {
    handleError(error);
  } finally {
    if (ticket === loadImage.ticket) $("loading").hidden = true;
  }
  renderPosition();
}

function setWindow(window) {
  state.window = window ? [window[0], Math.max(1, window[1])] : null;
  renderPosition();
  clearTimeout(setWindow.timer);
  setWindow.timer = setTimeout(loadImage, 60);
}

function move(instanceStep, frameStep) {
  if (!state.study) return;
  const images = state.study.images;
  if (instanceStep) {
    state.instance = (state.instance + instanceStep + images.length) % images.length;
    state.frame = 0;
  } else {
    const frames = currentImage().frames;
    state.frame = (state.frame + frameStep + frames) % frames;
  }
  loadImage();
}

// -- window/level by dragging ---------------------------------------------------------------

function startDrag(event) {
  if (!state.study) return;
  // back to the keyboard shortcuts: a focused W/L field would swallow them
  if (document.activeElement && document.activeElement !== document.body) {
    document.activeElement.blur();
  }
  const image = currentImage();
  const start = state.window || image.window || [128, 256];
  const origin = [event.clientX, event.clientY];
  const scale = Math.max(1, start[1]) / 300;
  const onMove = (e) => {
    const width = start[1] + (e.clientX - origin[0]) * scale;
    const centre = start[0] + (e.clientY - origin[1]) * scale;
    setWindow([centre, width]);
  };
  const onUp = () => {
    window.removeEventListener("pointermove", onMove);
    window.removeEventListener("pointerup", onUp);
  };
  window.addEventListener("pointermove", onMove);
  window.addEventListener("pointerup", onUp);
  event.preventDefault();
}

// -- lease countdown ----------------------------------------------------------------------

setInterval(() => {
  const lease = $("lease");
  if (!state.study || state.labeled) { lease.hidden = true; return; }
  const left = state.leaseUntil - Date.now() / 1000;
  lease.hidden = false;
  lease.classList.toggle("warn", left < 120);
  lease.textContent = left > 0 ? `lease ${formatSeconds(left)}` : "lease expired: claim again (n)";
}, 1000);

setInterval(() => {
  if (state.token && !$("empty").hidden && state.config) nextStudy();
}, 15000);

// -- wiring -------------------------------------------------------------------------------

document.addEventListener("keydown", (event) => {
  if (!state.token || event.target.matches("input, textarea")) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (/^[1-9]$/.test(key) && state.config && Number(key) <= state.config.labels.length) {
    submitLabel(state.config.labels[Number(key) - 1]);
  } else if (key === "s") {
    submitLabel("skip");
  } else if (key === "d") {
    submitLabel("not-diagnostic");
  } else if (key === "n") {
    if (!state.study || state.labeled || state.leaseUntil < Date.now() / 1000) nextStudy();
    else toast("Label this study first, or press s to skip it");
  } else if (key === "ArrowRight") {
    move(0, 1);
  } else if (key === "ArrowLeft") {
    move(0, -1);
  } else if (key === "ArrowDown" || key === "PageDown") {
    move(1, 0);
  } else if (key === "ArrowUp" || key === "PageUp") {
    move(-1, 0);
  } else if (key === "r") {
    setWindow(null);
  } else if (key === "i") {
    state.inverted = !state.inverted;
    $("image").classList.toggle("inverted", state.inverted);
  } else {
    return;
  }
  event.preventDefault();
});

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  $("signin-error").textContent = "";
  signIn($("token").value.trim());
});
$("signout").addEventListener("click", signOut);
$("check").addEventListener("click", nextStudy);
$("prev-instance").addEventListener("click", () => move(-1, 0));
$("next-instance").addEventListener("click", () => move(1, 0));
$("prev-frame").addEventListener("click", () => move(0, -1));
$("next-frame").addEventListener("click", () => move(0, 1));
$("reset").addEventListener("click", () => setWindow(null));
$("invert").addEventListener("click", () => {
  state.inverted = !state.inverted;
  $("image").classList.toggle("inverted", state.inverted);
});
for (const id of ["ww", "wc"]) {
  $(id).addEventListener("change", () => {
    const width = Number($("ww").value);
    const centre = Number($("wc").value);
    if (width > 0 && Number.isFinite(centre)) setWindow([centre, width]);
    $(id).blur();  // Enter applies the value and returns the keys to the shortcuts
  });
}
$("viewport").addEventListener("pointerdown", startDrag);

if (state.token) signIn(state.token); else show("signin");
