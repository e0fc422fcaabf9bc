// The playground: chat and completion through the server's public API (/v1/chat/completions and
// /v1/completions, streamed as Server-Sent Events, as any OpenAI client reads them), and a live panel of
// the server's state from /state. No framework, no build step, nothing loaded from another site.
"use strict";

const STATE_INTERVAL_MS = 1000;  // how often the panel polls /state (benchmarks/playground_polling.py uses it)
const HISTORY_MS = 5 * 60 * 1000;  // what the charts show
const KEY_NAME = "scalellm.apiKey";

const $ = (id) => document.getElementById(id);
const ui = {
  mode: "chat",
  model: null,
  controller: null,  // the AbortController of the request in flight
  chat: [],  // {role, content} of the conversation so far
  samples: [],  // {t, running, waiting, swapped, kv, tps} from /state
  lastState: null,
};

// ------------------------------------------------------------------------------------------------ API key

function loadKey() {
  const remembered = localStorage.getItem(KEY_NAME);
  $("remember-key").checked = remembered !== null;
  $("api-key").value = remembered ?? sessionStorage.getItem(KEY_NAME) ?? "";
}

function saveKey() {
  const key = $("api-key").value.trim();
  localStorage.removeItem(KEY_NAME);
  sessionStorage.removeItem(KEY_NAME);
  if (key) ($("remember-key").checked ? localStorage : sessionStorage).setItem(KEY_NAME, key);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// ------------------------------------------------------------------------------------------------ request body

function numberField(id, name, { integer = false, optional = false } = {}) {
  const raw = $(id).value.trim();
  if (raw === "") {
    if (optional) return undefined;
    throw new Error(`${name}: enter a number`);
  }
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${name}: ${raw} is not ${integer ? "an integer" : "a number"}`);
  }
  return value;  // ranges are the server's to check: its 400 names the field
}

function stopStrings() {
  const lines = $("stop-strings").value.split("\n").filter((line) => line !== "");
  return lines.map((line) => line.replace(/\\n/g, "\n").replace(/\\t/g, "\t"));
}

function samplingFields() {
  const body = {
    temperature: numberField("temperature", "temperature"),
    top_p: numberField("top-p", "top_p"),
    top_k: numberField("top-k", "top_k", { integer: true }),
    max_tokens: numberField("max-tokens", "max_tokens", { integer: true, optional: true }),
    seed: numberField("seed", "seed", { integer: true, optional: true }),
    priority: numberField("priority", "priority", { integer: true }),
    stream: true,
    // every chunk carries the usage so far (vLLM's continuous_usage_stats): a live token count
    stream_options: { include_usage: true, continuous_usage_stats: true },
  };
  const stop = stopStrings();
  if (stop.length) body.stop = stop;
  for (const name of Object.keys(body)) if (body[name] === undefined) delete body[name];
  return body;
}

// ------------------------------------------------------------------------------------------------ the log

function addEntry(log, kind, label, text) {
  const entry = document.createElement("div");
  entry.className = "message " + kind;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = label;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  const stats = document.createElement("div");
  stats.className = "stats";
  entry.append(role, content, stats);
  log.append(entry);
  log.scrollTop = log.scrollHeight;
  return entry;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function fmt(value, digits = 0) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : value.toFixed(digits);
}

// One generation's figures: the client's view (TTFT and decode rate from when chunks arrived), the server's
// token counts (the usage every chunk carries).
class Timing {
  constructor() {
    this.start = performance.now();
    this.first = null;
    this.last = null;
    this.usage = null;
    this.finish = null;
  }
  text(outcome) {
    const parts = [];
    const completion = this.usage?.completion_tokens;
    if (completion !== undefined) parts.push(`${completion} tokens`);
    if (this.usage?.prompt_tokens !== undefined) parts.push(`prompt ${this.usage.prompt_tokens}`);
    if (this.first !== null) parts.push(`TTFT ${fmt(this.first - this.start)} ms`);
    if (completion > 1 && this.last > this.first) {
      parts.push(`${fmt((completion - 1) / ((this.last - this.first) / 1000), 1)} tok/s`);
    }
    parts.push(outcome ?? this.finish ?? "streaming");
    return parts.join(" · ");
  }
}

// What the answer shows, redrawn at most once per frame: a fast server streams hundreds of chunks a second,
// and redrawing per chunk would keep the page's thread busy (the live panel's timer starved with it).
class AnswerView {
  constructor(log, entry, timing) {
    this.log = log;
    this.text = document.createTextNode("");
    entry.querySelector(".content").append(this.text);
    this.stats = entry.querySelector(".stats");
    this.timing = timing;
    this.pending = "";
    this.frame = null;
  }
  add(text) {
    this.pending += text;
    this.frame ??= requestAnimationFrame(() => this.flush());
  }
  flush() {
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.frame = null;
    const follow = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 40;  // at the bottom
    if (this.pending) this.text.appendData(this.pending);
    this.pending = "";
    this.stats.textContent = this.timing.text();
    if (follow) this.log.scrollTop = this.log.scrollHeight;
  }
}

// POST a streamed request; its text goes to ``view``, its figures to ``timing``.
async function streamRequest(path, body, view, timing) {
  const controller = new AbortController();
  ui.controller = controller;
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                       signal: controller.signal });
  if (!response.ok) {
    const error = await response.json().catch(() => null);
    const message = error?.error?.message ?? response.statusText;
    throw new Error(response.status === 401 ? `${message}: enter the server's API key` : `${response.status}: ${message}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) timing.usage = chunk.usage;
      for (const choice of chunk.choices ?? []) {
        const text = choice.delta ? choice.delta.content : choice.text;
        if (text) {
          const now = performance.now();
          if (timing.first === null) timing.first = now;
          timing.last = now;
          view.add(text);
        }
        if (choice.finish_reason) timing.finish = choice.finish_reason;
      }
    }
  }
}

async function send() {
  const prompt = $("prompt").value;
  if (!prompt.trim() || ui.controller) return;
  showError("");
  if (ui.model === null) await pollState();  // the model's name comes with the server's state
  let body;
  try {
    body = { model: ui.model ?? "", ...samplingFields() };
  } catch (error) {
    showError(error.message);
    return;
  }
  saveKey();
  const chat = ui.mode === "chat";
  const log = chat ? $("chat-log") : $("completion-log");
  let messages;
  if (chat) {
    const system = $("system-prompt").value.trim();
    messages = [...(system ? [{ role: "system", content: system }] : []), ...ui.chat,
                { role: "user", content: prompt }];
    body.messages = messages;
  } else {
    body.prompt = prompt;
  }
  addEntry(log, chat ? "user" : "prompt", chat ? "user" : "prompt", prompt);
  const entry = addEntry(log, chat ? "assistant streaming" : "completion streaming", chat ? "assistant" : "completion", "");
  $("prompt").value = "";
  setBusy(true);
  const timing = new Timing();
  const view = new AnswerView(log, entry, timing);
  let outcome = null;
  try {
    await streamRequest(chat ? "/v1/chat/completions" : "/v1/completions", body, view, timing);
  } catch (error) {
    if (error.name === "AbortError") {
      outcome = "stopped";
      entry.classList.add("stopped");
    } else {
      outcome = "failed";
      entry.classList.add("failed");
      showError(error.message);
    }
  } finally {
    view.flush();
    entry.classList.remove("streaming");
    setBusy(false);
  }
  entry.querySelector(".stats").textContent = timing.text(outcome);
  entry.dataset.outcome = outcome ?? timing.finish ?? "done";
  if (chat && outcome !== "failed" && view.text.data) {  // the next turn sends the conversation so far
    ui.chat.push({ role: "user", content: prompt }, { role: "assistant", content: view.text.data });
  }
}

function setBusy(busy) {
  if (!busy) ui.controller = null;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function stop() {
  ui.controller?.abort();  // closes the connection: the server aborts the request and frees its KV pages
}

function clearLog() {
  stop();
  ui.chat = [];
  $(ui.mode === "chat" ? "chat-log" : "completion-log").replaceChildren();
  showError("");
}

function setMode(mode) {
  ui.mode = mode;
  for (const [id, active] of [["mode-chat", mode === "chat"], ["mode-completion", mode === "completion"]]) {
    $(id).classList.toggle("active", active);
    $(id).setAttribute("aria-selected", String(active));
  }
  $("chat-log").hidden = mode !== "chat";
  $("system-row").hidden = mode !== "chat";
  $("completion-log").hidden = mode === "chat";
  $("prompt").placeholder = mode === "chat" ? "Type a message. Enter sends, Shift+Enter starts a new line."
                                            : "Text to continue. Enter sends, Shift+Enter starts a new line.";
}

// ------------------------------------------------------------------------------------------------ state panel

async function pollState() {
  try {
    const response = await fetch("/state", { cache: "no-store" });
    if (!response.ok) throw new Error(response.statusText);
    showState(await response.json());
  } catch (error) {
    $("server-status").textContent = "unreachable";
    $("server-status").className = "badge bad";
  }
}

function showState(state) {
  const previous = ui.lastState;
  ui.lastState = state;
  ui.model = state.model;
  $("model-name").textContent = state.model + (state.simulated_device ? ` (simulated ${state.simulated_device})` : "");
  $("server-status").textContent = state.status;
  $("server-status").className = "badge " + (state.status === "ok" ? "ok" : "bad");
  const tps = previous && state.time > previous.time
    ? (state.generation_tokens - previous.generation_tokens) / (state.time - previous.time) : null;
  const { running, waiting, swapped } = state.requests;
  $("state-running").textContent = running + (state.max_num_seqs ? ` / ${state.max_num_seqs}` : "");
  $("state-waiting").textContent = waiting;
  $("state-swapped").textContent = swapped;
  $("state-kv").textContent = `${fmt(100 * state.kv_cache.usage, 1)}% (${state.kv_cache.pages_in_use} pages)`;
  $("state-preemptions").textContent = state.preemptions;
  const hitRate = state.prefix_cache.hit_rate;
  $("state-prefix").textContent = hitRate === null ? "–" : `${fmt(100 * hitRate, 1)}%`;
  $("state-tps").textContent = fmt(tps, 1);
  $("state-updated").textContent = new Date(state.time * 1000).toLocaleTimeString();
  const now = state.time * 1000;
  ui.samples.push({ t: now, running, waiting, swapped, kv: 100 * state.kv_cache.usage, tps });
  while (ui.samples.length && ui.samples[0].t < now - HISTORY_MS) ui.samples.shift();
  $("charts").dataset.samples = ui.samples.length;
  drawCharts(now);
}

function drawCharts(now) {
  const style = getComputedStyle(document.documentElement);
  const color = (name) => style.getPropertyValue(name).trim();
  drawChart($("chart-tps"), now, [["tps", color("--tps")]]);
  drawChart($("chart-queue"), now, [["running", color("--running")], ["waiting", color("--waiting")],
                                    ["swapped", color("--swapped")]]);
  drawChart($("chart-kv"), now, [["kv", color("--kv")]], 100);
}

// Lines of ``series`` ([field, color]) over the last HISTORY_MS, on one scale from 0 to ``max`` (by default
// the largest value shown), labelled at the top left.
function drawChart(canvas, now, series, max = null) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  let top = max;
  if (top === null) {
    top = 1;
    for (const s of ui.samples) for (const [field] of series) top = Math.max(top, s[field] ?? 0);
  }
  ctx.strokeStyle = "#e4e7ec";
  ctx.lineWidth = 1;
  for (let minute = 1; minute < HISTORY_MS / 60000; minute++) {  // a grid line per minute
    const x = width - (minute * 60000 / HISTORY_MS) * width;
    ctx.beginPath();
    ctx.moveTo(x, 0);
    ctx.lineTo(x, height);
    ctx.stroke();
  }
  const pad = 3;
  const xOf = (t) => width - ((now - t) / HISTORY_MS) * width;
  const yOf = (v) => height - pad - (v / top) * (height - 2 * pad);
  ctx.lineWidth = 1.5;
  for (const [field, stroke] of series) {
    ctx.strokeStyle = stroke;
    ctx.beginPath();
    let drawing = false;
    for (const s of ui.samples) {
      const v = s[field];
      if (v === null || v === undefined) { drawing = false; continue; }
      if (drawing) ctx.lineTo(xOf(s.t), yOf(v)); else ctx.moveTo(xOf(s.t), yOf(v));
      drawing = true;
    }
    ctx.stroke();
  }
  ctx.fillStyle = "#667085";
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillText(top >= 10 ? top.toFixed(0) : top.toFixed(1), 3, 10);
}

let pollTimer = null;

function schedulePoll() {  // one poll at a time; none while the tab is hidden
  clearTimeout(pollTimer);
  if (document.hidden) return;
  pollTimer = setTimeout(async () => {
    await pollState();
    schedulePoll();
  }, STATE_INTERVAL_MS);
}

// ------------------------------------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  loadKey();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearLog);
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  $("mode-completion").addEventListener("click", () => setMode("completion"));
  $("api-key").addEventListener("change", saveKey);
  $("remember-key").addEventListener("change", saveKey);
  document.addEventListener("visibilitychange", () => (document.hidden ? clearTimeout(pollTimer) : schedulePoll()));
  window.addEventListener("resize", () => drawCharts(ui.lastState ? ui.lastState.time * 1000 : Date.now()));
  pollState().then(schedulePoll);
});
