// backtrack-sampler playground: plain JS, no build step, talks only to the server that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  key: sessionStorage.getItem("backtrack-sampler-key") || "",
  mode: "generate",
  controller: null,   // AbortController of the running generation
  started: 0,
  timer: null,
  doc: null,          // {final, prov, strikes, prompt}
  rewinds: [],        // [{index, text, reason, chosen}]
  stats: null,
  human: null,        // {tokens, text, finish, busy}
  drawQueued: false,
  strategies: {},     // name -> {name, description, parameters (a JSON Schema)} from GET /v1/backtrack/strategies
};

// ---------------------------------------------------------------------------------------------
// requests
// ---------------------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  if (ui.key) h["Authorization"] = "Bearer " + ui.key;
  return h;
}

class ServerError extends Error {
  constructor(message, status, param) { super(message); this.status = status; this.param = param; }
}

async function post(path, body, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`, param = null;
    try {
      const error = (await response.json()).error;
      if (error && error.message) { message = error.message; param = error.param; }
    } catch (_) { /* not JSON */ }
    if (response.status === 401) askKey(message);
    markInvalid(param);
    throw new ServerError(message, response.status, param);
  }
  return response;
}

function numberField(id) {
  const text = $(id).value.trim();
  if (text === "") return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? value : text; // let the server explain what is wrong with it
}

function lines(id) {
  return $(id).value.split("\n").map((s) => s.replace(/\r$/, "")).filter((s) => s.trim() !== "");
}

/** The request fields shared by completions, chat completions and candidates. */
function requestFields() {
  const body = {};
  for (const key of ["temperature", "top_k", "top_p", "min_p", "seed"]) {
    const value = numberField(key);
    if (value !== undefined) body[key] = value;
  }
  const banned = lines("banned"), regexes = lines("regexes");
  if (banned.length) body.banned_strings = banned;
  if (regexes.length) body.banned_regex = regexes;
  const schema = $("json-schema").value.trim();
  $("json-schema").classList.remove("invalid");
  if (schema) {  // text that is not JSON is sent as it is: the server's 400 says what is wrong
    let parsed = schema;
    try { parsed = JSON.parse(schema); } catch (_) { /* keep the text */ }
    body.response_format = { type: "json_schema", json_schema: { name: "playground", schema: parsed } };
  }
  const strategy = chainSpecs();
  if (strategy.length) body.strategy = strategy;
  if (chat()) {
    const messages = [];
    if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
    messages.push({ role: "user", content: $("prompt").value });
    body.messages = messages;
  } else {
    body.prompt = $("prompt").value;
  }
  return body;
}

const chat = () => document.querySelector("input[name=kind]:checked").value === "chat";

// ---------------------------------------------------------------------------------------------
// strategies: the controls are built from the server's list (GET /v1/backtrack/strategies)
// ---------------------------------------------------------------------------------------------
async function loadStrategies() {
  const select = $("strategy-select");
  try {
    const response = await fetch("/v1/backtrack/strategies", { headers: headers() });
    if (!response.ok) throw new Error(response.statusText);
    const data = (await response.json()).data;
    ui.strategies = Object.fromEntries(data.map((s) => [s.name, s]));
    const options = data.filter((s) => s.name !== "none").map((s) => {
      const option = new Option(s.name, s.name);
      option.title = s.description;
      return option;
    });
    select.replaceChildren(...options);
  } catch (_) {
    select.replaceChildren(new Option("(no strategies: the server did not answer)", ""));
  }
}

/** The kind of input a parameter's JSON Schema gets: bool, integer, number, string, enum, lines (a
 *  list of strings, one per line) or json (anything else, typed as JSON). */
function kindOf(schema) {
  let options = schema.anyOf ? schema.anyOf.filter((s) => s.type !== "null") : [schema];
  const strings = options.find((s) => s.type === "array" && s.items && s.items.type === "string");
  if (options.length > 1) return strings && options.every((s) => s.type === "string" || s === strings) ? "lines" : "json";
  const only = options[0] || {};
  if (only.enum) return "enum";
  if (only === strings) return "lines";
  return { boolean: "bool", integer: "integer", number: "number", string: "string" }[only.type] || "json";
}

function firstLine(text) { return (text || "").split("\n")[0]; }

function addStrategy(name) {
  const entry = ui.strategies[name];
  if (!entry) return;
  const li = document.createElement("li");
  li.className = "strategy";
  li.dataset.name = name;
  const head = document.createElement("div");
  head.className = "head";
  const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "✕", title: "remove" });
  remove.addEventListener("click", () => li.remove());
  const about = span("muted", firstLine(entry.description), entry.description);
  head.append(Object.assign(document.createElement("b"), { textContent: name }), about, remove);
  const knobs = document.createElement("div");
  knobs.className = "knobs";
  const schema = entry.parameters || {};
  const required = new Set(schema.required || []);
  for (const [param, prop] of Object.entries(schema.properties || {})) knobs.append(knob(param, prop, required.has(param)));
  li.append(head, knobs);
  $("chain").append(li);
}

/** A labelled input for one parameter (``data-param``, ``data-kind``); the default is the placeholder. */
function knob(param, prop, required) {
  const kind = kindOf(prop);
  const label = document.createElement("label");
  label.title = prop.description || "";
  let input;
  if (kind === "bool") {
    input = Object.assign(document.createElement("input"), { type: "checkbox", checked: prop.default === true });
    label.className = "flag";
    label.append(input, param);
  } else {
    if (kind === "enum") {
      input = document.createElement("select");
      const values = (prop.anyOf ? prop.anyOf.find((s) => s.enum) : prop).enum;
      input.append(new Option("", ""), ...values.map((v) => new Option(String(v), JSON.stringify(v))));
    } else if (kind === "lines" || kind === "json") {
      input = Object.assign(document.createElement("textarea"), { rows: 2 });
      label.className = "wide";
    } else {
      input = Object.assign(document.createElement("input"), { type: kind === "string" ? "text" : "number" });
      if (kind === "integer") input.step = "1";
      if (kind === "number") input.step = "any";
    }
    if (prop.default !== undefined && prop.default !== null) {
      input.placeholder = kind === "lines" ? [].concat(prop.default).join("\n") : kind === "string" ? prop.default
        : JSON.stringify(prop.default);
    } else if (kind === "lines") {
      input.placeholder = "one per line";
    }
    label.append(param, required ? span("req", " *", "required") : "", input);
  }
  input.dataset.param = param;
  input.dataset.kind = kind;
  if (kind === "bool") input.dataset.default = String(prop.default === true);
  input.required = required;
  input.addEventListener("input", () => input.classList.remove("invalid"));
  return label;
}

/** The request's ``strategy`` list: one ``{name, ...parameters}`` per card, in order; a parameter
 *  left empty is not sent (the strategy's default applies), the server checks the values. */
function chainSpecs() {
  return [...document.querySelectorAll("#chain > li")].map((li) => {
    const spec = { name: li.dataset.name };
    for (const input of li.querySelectorAll("[data-param]")) {
      const value = knobValue(input);
      if (value !== undefined) spec[input.dataset.param] = value;
    }
    return spec;
  });
}

function knobValue(input) {
  const kind = input.dataset.kind, text = input.value;
  if (kind === "bool") return input.checked === (input.dataset.default === "true") ? undefined : input.checked;
  if (kind === "lines") {
    const items = text.split("\n").map((s) => s.replace(/\r$/, "")).filter((s) => s.trim() !== "");
    return items.length || input.required ? items : undefined;
  }
  if (text === "") return kind === "string" && input.required ? "" : undefined;
  if (kind === "string") return text;
  if (kind === "integer" || kind === "number") {
    const value = Number(text.trim());
    return Number.isFinite(value) ? value : text; // let the server explain what is wrong with it
  }
  try { return JSON.parse(text); } catch (_) { return text; }  // json, enum
}

/** Marks the input a server error names (``strategy[1].top_p_flat``). */
function markInvalid(param) {
  if ((param || "").startsWith("response_format")) $("json-schema").classList.add("invalid");
  const match = /^strategy\[(\d+)\](?:\.(\w+))?/.exec(param || "");
  if (!match) return;
  const li = document.querySelectorAll("#chain > li")[Number(match[1])];
  const input = li && (match[2] ? li.querySelector(`[data-param="${match[2]}"]`) : null);
  if (input) input.classList.add("invalid");
}

// ---------------------------------------------------------------------------------------------
// streaming generation
// ---------------------------------------------------------------------------------------------
async function generate() {
  stop();
  hideError();
  const body = requestFields();
  const maxTokens = numberField("max_tokens");
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  body.stream = true;
  body.stream_options = { include_backtrack: true, include_usage: true };
  const controller = new AbortController();
  ui.controller = controller;
  ui.doc = { final: "", prov: "", strikes: [], prompt: chat() ? "" : body.prompt };
  ui.rewinds = [];
  ui.stats = { delivered: 0, rewound: 0, rewinds: 0, seconds: null, finish: null };
  ui.started = performance.now();
  setRunning(true, "running");
  draw();
  try {
    const response = await post(chat() ? "/v1/chat/completions" : "/v1/completions", body, controller.signal);
    await readEvents(response, controller.signal);
    if (ui.controller === controller) setRunning(false, ui.stats.finish ? "done · " + ui.stats.finish : "done");
  } catch (error) {
    if (error.name === "AbortError") { setRunning(false, "stopped"); return; }
    setRunning(false, "error");
    showError(error.message);
  } finally {
    if (ui.controller === controller) ui.controller = null;
    draw();
  }
}

async function readEvents(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
    if (signal.aborted) return;
  }
}

function onChunk(chunk) {
  if (chunk.error) throw new ServerError(chunk.error.message, 500, chunk.error.param);
  if (chunk.backtrack) onEvent(chunk.backtrack);  // before the text: a rewind applies first
  const choice = chunk.choices && chunk.choices[0];
  if (choice) {
    const text = choice.delta ? choice.delta.content : choice.text;
    if (text) ui.doc.final += text;
    if (choice.finish_reason) ui.stats.finish = choice.finish_reason;
  }
  queueDraw();
}

/** Applies one backtrack event (the same model as backtrack_sampler.events.Transcript). */
function onEvent(e) {
  const doc = ui.doc;
  if (e.type === "rewind") {
    doc.prov = doc.prov.slice(0, Math.max(e.at - doc.final.length, 0));
    const inner = doc.strikes.filter((s) => s.at > e.at).map((s) => ({ ...s, at: s.at - e.at }));
    doc.strikes = doc.strikes.filter((s) => s.at <= e.at);
    doc.strikes.push({ at: e.at, text: e.text, reason: e.reason, inner });
    ui.rewinds.push({ index: e.index, text: e.text, reason: e.reason, chosen: undefined });
    ui.stats.rewound += e.tokens.length;
    ui.stats.rewinds += 1;
  } else if (e.type === "final") {
    ui.stats.delivered += e.tokens;
  } else if (e.type === "provisional") {
    doc.prov = e.text;
  } else if (e.type === "chosen") {
    const r = ui.rewinds.find((x) => x.index === e.rewind);
    if (r) r.chosen = e.text;
  } else if (e.type === "done") {
    Object.assign(ui.stats, { delivered: e.delivered, rewound: e.rewound, rewinds: e.rewinds, seconds: e.seconds });
    if (e.finish_reason) ui.stats.finish = e.finish_reason;
  }
}

function stop() {
  if (ui.controller) {
    ui.controller.abort();   // the server sees the connection close and stops the generation
    ui.controller = null;
    setRunning(false, "stopped");
  }
}

// ---------------------------------------------------------------------------------------------
// drawing
// ---------------------------------------------------------------------------------------------
function queueDraw() {
  if (ui.drawQueued) return;
  ui.drawQueued = true;
  requestAnimationFrame(() => { ui.drawQueued = false; draw(); });
}

function span(cls, text, title) {
  const s = document.createElement("span");
  s.className = cls;
  s.textContent = text;
  if (title) s.title = title;
  return s;
}

/** Nodes for `text` with `strikes` placed at their offsets; chars before `finalLen` are final. */
function textNodes(text, strikes, finalLen, struck) {
  const out = [];
  const piece = (a, b) => {
    if (b <= a) return;
    if (struck) { out.push(document.createTextNode(text.slice(a, b))); return; }
    const f = Math.min(Math.max(finalLen, a), b);
    if (f > a) out.push(span("final", text.slice(a, f)));
    if (b > f) out.push(span("provisional", text.slice(f, b)));
  };
  let done = 0;
  for (const s of strikes) {
    const at = Math.min(s.at, text.length);
    piece(done, at);
    done = Math.max(done, at);
    let lead = s.text.match(/^\s*/)[0];  // a leading space reads better unstruck
    if (s.inner.some((x) => x.at < lead.length)) lead = "";
    if (lead) out.push(document.createTextNode(lead));
    const node = span("struck", "", "rewound: " + (s.reason || "no reason given"));
    const inner = s.inner.map((x) => ({ ...x, at: x.at - lead.length }));
    node.append(...textNodes(s.text.slice(lead.length), inner, 0, true));
    out.push(node);
  }
  piece(done, text.length);
  return out;
}

function draw() {
  const out = $("output");
  if (ui.mode === "human") return drawHuman();
  const doc = ui.doc;
  if (!doc) return;
  const nodes = [];
  if (doc.prompt) nodes.push(span("prompt", doc.prompt));
  nodes.push(...textNodes(doc.final + doc.prov, doc.strikes, doc.final.length, false));
  if (ui.controller) nodes.push(span("cursor", ""));
  const follow = out.scrollTop + out.clientHeight >= out.scrollHeight - 30;
  out.replaceChildren(...nodes);
  if (follow) out.scrollTop = out.scrollHeight;
  drawSide();
}

function drawSide() {
  const s = ui.stats || { delivered: 0, rewound: 0, rewinds: 0 };
  const seconds = s.seconds != null ? s.seconds : ui.started ? (performance.now() - ui.started) / 1000 : null;
  $("st-delivered").textContent = s.delivered;
  $("st-rewound").textContent = s.rewound;
  $("st-rewinds").textContent = s.rewinds;
  $("st-time").textContent = seconds == null ? "–" : seconds.toFixed(1) + " s";
  $("st-speed").textContent = seconds ? (s.delivered / seconds).toFixed(1) : "–";
  const list = $("rewinds");
  if (!ui.rewinds.length) { list.replaceChildren(Object.assign(document.createElement("li"), { className: "muted empty", textContent: "none yet" })); return; }
  const items = ui.rewinds.slice(-200).reverse().map((r) => {
    const li = document.createElement("li");
    li.append(span("why", `#${r.index + 1} · ${r.reason || "rewind"}`), span("rej", r.text.trimStart() || "∅"));
    if (r.chosen !== undefined) {
      li.append(span("arrow", "→"), r.chosen === null ? span("muted", "discarded by a later rewind")
        : span("cho", r.chosen.trimStart() || "∅"));
    }
    return li;
  });
  list.replaceChildren(...items);
}

function setRunning(running, status) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
  const el = $("st-status");
  el.textContent = status;
  el.className = running ? "running" : status.startsWith("done") ? "done" : status === "stopped" ? "stopped" : "";
  clearInterval(ui.timer);
  if (running) ui.timer = setInterval(drawSide, 250);
}

function showError(message) { const e = $("error"); e.textContent = message; e.hidden = false; }
function hideError() { $("error").hidden = true; }

// ---------------------------------------------------------------------------------------------
// human guidance: the page holds the chosen tokens, the server returns the candidates
// ---------------------------------------------------------------------------------------------
async function humanStep(tokens) {
  hideError();
  const body = requestFields();
  body.tokens = tokens;
  const topN = numberField("top_n");
  if (topN !== undefined) body.top_n = topN;
  const maxTokens = numberField("max_tokens");
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  ui.human = { ...(ui.human || {}), busy: true };
  setRunning(true, "thinking");
  drawHuman();
  try {
    const response = await post("/v1/backtrack/candidates", body);
    const r = await response.json();
    const previous = ui.human.rewinds || [];
    ui.human = { tokens: r.tokens, text: r.text, candidates: r.candidates, finish: r.finish_reason, busy: false,
                 prompt: chat() ? "" : body.prompt, rewinds: previous };
    if (r.rewind) {
      ui.human.rewinds.push(r.rewind);
      ui.rewinds.push({ index: ui.rewinds.length, text: r.rewind.text, reason: r.rewind.reason, chosen: undefined });
      ui.stats.rewound += r.rewind.tokens.length;
      ui.stats.rewinds += 1;
    }
    ui.stats.delivered = r.tokens.length;
    setRunning(false, r.finish_reason ? "done · " + r.finish_reason : "your turn");
  } catch (error) {
    ui.human.busy = false;
    setRunning(false, "error");
    showError(error.message);
  }
  drawHuman();
}

function drawHuman() {
  const h = ui.human;
  const out = $("output");
  if (!h || !h.tokens) {
    out.replaceChildren(Object.assign(document.createElement("p"), { className: "placeholder",
      textContent: "Press Generate to start: the model proposes its most likely next tokens, you click one (or go back)." }));
    $("candidates").replaceChildren();
    drawSide();
    return;
  }
  const nodes = [];
  if (h.prompt) nodes.push(span("prompt", h.prompt));
  nodes.push(span("final", h.text));
  if (!h.finish) nodes.push(span("cursor", ""));
  out.replaceChildren(...nodes);
  out.scrollTop = out.scrollHeight;
  const list = (h.finish ? [] : h.candidates || []).map((c, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "cand";
    b.disabled = !!h.busy;
    b.dataset.token = c.token;
    const bar = span("bar", "");
    bar.style.width = (100 * c.probability).toFixed(1) + "%";
    const label = c.eos ? "⏎ end of text" : JSON.stringify(c.text).slice(1, -1) || `[token ${c.token}]`;
    const left = span("", "");
    left.append(span("k", String(i + 1)), span("t", label));
    b.append(bar, left, span("p", (100 * c.probability).toFixed(1) + "%"));
    b.addEventListener("click", () => humanStep([...h.tokens, c.token]));
    return b;
  });
  if (h.finish) list.push(span("muted", h.finish === "stop" ? "The model ended the text." : "Token limit reached."));
  $("candidates").replaceChildren(...list);
  $("back").disabled = !!h.busy || !h.tokens.length;
  drawSide();
}

// ---------------------------------------------------------------------------------------------
// wiring
// ---------------------------------------------------------------------------------------------
function setMode(mode) {
  stop();
  ui.mode = mode;
  document.body.classList.toggle("mode-human", mode === "human");
  for (const tab of document.querySelectorAll(".tab")) {
    const active = tab.dataset.mode === mode;
    tab.classList.toggle("active", active);
    tab.setAttribute("aria-selected", String(active));
  }
  $("human").hidden = mode !== "human";
  $("generate").textContent = mode === "human" ? "Start" : "Generate";
  ui.rewinds = [];
  ui.stats = { delivered: 0, rewound: 0, rewinds: 0, seconds: null };
  ui.started = 0;
  if (mode === "human") drawHuman(); else if (ui.doc) draw(); else drawSide();
}

function askKey(message) {
  const dialog = $("key-dialog");
  if (message) dialog.querySelector("p").textContent = message + " — this server was started with --api-key.";
  $("key-input").value = ui.key;
  if (!dialog.open) dialog.showModal();
}

function start(event) {
  if (event) event.preventDefault();
  if (ui.mode === "human") {
    ui.human = null;
    ui.rewinds = [];
    ui.stats = { delivered: 0, rewound: 0, rewinds: 0, seconds: null };
    ui.started = 0;
    humanStep([]);
  } else {
    generate();
  }
}

function init() {
  $("controls").noValidate = true; // the server validates, and its messages are shown as they are
  $("controls").addEventListener("submit", start);
  $("stop").addEventListener("click", stop);
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  for (const radio of document.querySelectorAll("input[name=kind]")) {
    radio.addEventListener("change", () => { $("system").hidden = !chat(); });
  }
  $("strategy-add").addEventListener("click", () => addStrategy($("strategy-select").value));
  $("banned-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    const text = await file.text();
    let phrases;
    try {
      const data = JSON.parse(text);   // a JSON list of phrases or of [phrase, multiplier] pairs
      phrases = data.map((item) => (Array.isArray(item) ? item[0] : item)).filter((p) => typeof p === "string");
    } catch (_) {
      phrases = text.split("\n").map((s) => s.trim()).filter((s) => s && !s.startsWith("#"));
    }
    const existing = lines("banned");
    $("banned").value = [...existing, ...phrases].join("\n");
    $("banned-count").textContent = `${phrases.length} phrases loaded from ${file.name}`;
    event.target.value = "";
  });
  $("back").addEventListener("click", () => { if (ui.human && ui.human.tokens.length) humanStep(ui.human.tokens.slice(0, -1)); });
  $("restart").addEventListener("click", () => start());
  $("key-button").addEventListener("click", () => askKey());
  $("key-dialog").addEventListener("close", () => {
    if ($("key-dialog").returnValue === "ok") {
      ui.key = $("key-input").value.trim();
      sessionStorage.setItem("backtrack-sampler-key", ui.key);
      loadModel();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (ui.mode !== "human" || !ui.human || ui.human.busy || event.target.matches("input, textarea")) return;
    const n = Number(event.key);
    const buttons = document.querySelectorAll("#candidates .cand");
    if (n >= 1 && n <= buttons.length) buttons[n - 1].click();
    if (event.key === "Backspace") $("back").click();
  });
  loadModel();
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      let message = "The server needs an API key";
      try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
      $("model").textContent = "key needed";
      askKey(message.charAt(0).toUpperCase() + message.slice(1));
      return;
    }
    const data = await response.json();
    $("model").textContent = data.data[0].id;
    await loadStrategies();
  } catch (error) {
    $("model").textContent = "offline";
  }
}

init();
