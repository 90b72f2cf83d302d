// The web chat: conversations kept in this browser (localStorage), replies streamed from
// /v1/chat/completions and shown as Markdown (markdown.js, never as HTML), sampling settings,
// a model picker when the server serves several models, tokens/s after each reply. A turn that
// fails is shown with its reason and left out of the conversation, so the next one works.
import {render} from "./markdown.js";

const $ = (id) => document.getElementById(id);
const CHATS = "herd.chats", SETTINGS = "herd.settings";
const SAMPLING = ["temperature", "top_p", "max_tokens", "seed"];  // number inputs sent when not empty
const KEPT = ["system", "model", ...SAMPLING];  // settings kept across reloads (never the API key)

let chats = load(CHATS, []);  // [{id, title, messages: [{role, content, note}], skip}], most recent first
let current = null;           // the conversation shown; null for a new one, saved once a turn succeeds
let controller = null;        // aborts the reply being streamed
let models = [];              // ids from /v1/models

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

function store(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (e) {
    $("status").textContent = "Not saved in this browser: " + e.message;
  }
}

function saveSettings() {
  store(SETTINGS, Object.fromEntries(KEPT.map((k) => [k, $(k).value])));
}

function restoreSettings() {  // the model is picked once /v1/models has answered
  const saved = load(SETTINGS, {});
  for (const k of KEPT) if (typeof saved[k] === "string" && k !== "model") $(k).value = saved[k];
}

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("apikey").value) h["Authorization"] = "Bearer " + $("apikey").value;
  return h;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    if (r.ok) models = (await r.json()).data.map((m) => m.id);
  } catch {
    return;
  }
  const wanted = load(SETTINGS, {}).model;
  $("model").replaceChildren(...models.map((id) => new Option(id, id, false, id === wanted)));
  $("model").hidden = models.length < 2;
  $("model-name").textContent = models.length === 1 ? models[0] : "";
}

function note(parent, text) {
  const n = parent.appendChild(document.createElement("span"));
  n.className = "note";
  n.textContent = text;
  return n;
}

/** A message's bubble: a user's text as typed, an assistant's as Markdown, then its note. */
function bubble(message, dropped = false) {
  const div = document.createElement("div");
  div.className = "msg " + message.role + (dropped ? " dropped" : "");
  if (message.role === "user") div.textContent = message.content;
  else div.appendChild(document.createElement("div")).appendChild(render(message.content));
  if (message.note) note(div, message.note);
  if (dropped) div.title = "left out of what the model sees: the conversation outgrew its context";
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function showChat() {
  $("messages").replaceChildren();
  if (current) current.messages.forEach((m, i) => { bubble(m, i < current.skip).dataset.done = "true"; });
  markCurrent();
}

function markCurrent() {
  for (const li of $("chats").children) li.classList.toggle("current", current !== null && li.dataset.id === current.id);
}

function showList() {
  $("chats").replaceChildren(...chats.map((c) => {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    const open = li.appendChild(document.createElement("button"));
    open.className = "open";
    open.textContent = c.title;
    const del = li.appendChild(document.createElement("button"));
    del.className = "delete";
    del.textContent = "×";
    del.setAttribute("aria-label", "Delete " + c.title);
    return li;
  }));
  markCurrent();
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

function requestBody(convo, text, skip) {
  const system = $("system").value.trim();
  const messages = (system ? [{role: "system", content: system}] : [])
    .concat(convo.messages.slice(skip).map(({role, content}) => ({role, content})), {role: "user", content: text});
  const body = {model: $("model").value || models[0] || "", messages, stream: true,
                stream_options: {include_usage: true}};
  for (const k of SAMPLING) if ($(k).value !== "") body[k] = Number($(k).value);
  return body;
}

class TurnError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

/** Stream one reply into `out` and `result` ({reply, finish, tokens, rate, model}). Throws TurnError for an error. */
async function stream(body, out, result) {
  const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), signal: controller.signal,
                                                  body: JSON.stringify(body)});
  if (!r.ok) {
    const error = (await r.json().catch(() => ({}))).error || {};
    throw new TurnError(error.message || `${r.status} ${r.statusText}`, error.code);
  }
  const reader = r.body.getReader(), decoder = new TextDecoder(), start = performance.now();
  Object.assign(result, {reply: "", finish: null, tokens: null, model: body.model, first: null});
  let frame = 0;  // one render per animation frame, however many chunks arrive
  const draw = () => { frame = 0; out.firstChild.replaceChildren(render(result.reply)); out.scrollIntoView({block: "end"}); };
  try {
    await read(reader, decoder, result, () => { frame ||= requestAnimationFrame(draw); });
  } finally {
    cancelAnimationFrame(frame);
  }
  draw();
  const seconds = (performance.now() - (result.first ?? start)) / 1000, n = result.tokens ?? 0;
  result.rate = n > 1 && seconds > 0 ? (n - 1) / seconds : n / ((performance.now() - start) / 1000);
}

/** Read the server-sent events into `result`, calling `changed` when the reply grows. */
async function read(reader, decoder, result, changed) {
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const ev of events) {
      const data = ev.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new TurnError(chunk.error.message, chunk.error.code);
      if (chunk.usage) result.tokens = chunk.usage.completion_tokens;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      result.model = chunk.model;
      if (choice.delta.content) {
        result.first ??= performance.now();
        result.reply += choice.delta.content;
        changed();
      }
      if (choice.finish_reason) result.finish = choice.finish_reason;
    }
  }
}

/** Stream the reply into `result`, leaving out the oldest turns (never the system prompt) while the
 *  conversation outgrows the context; how many messages were left out. */
async function reply(convo, text, out, result) {
  for (let skip = convo.skip; ; skip += 2) {
    try {
      await stream(requestBody(convo, text, skip), out, result);
      return skip;
    } catch (e) {
      if (!(e instanceof TurnError && e.code === "context_length_exceeded" && skip < convo.messages.length)) throw e;
    }
  }
}

function describe(result, convo, skip) {
  const parts = [];
  if (models.length > 1) parts.push(result.model);
  if (result.tokens !== null) parts.push(`${result.tokens} tokens, ${result.rate.toFixed(1)} tokens/s`);
  if (result.finish === "length") parts.push("stopped at the max tokens limit (see Settings)");
  if (skip > convo.skip) parts.push(`the ${skip} oldest messages no longer fit the context and were left out`);
  return parts.join(" · ");
}

function keep(convo, user, assistant, skip) {
  const shifted = skip !== convo.skip;
  convo.messages.push(user, assistant);
  convo.skip = skip;
  if (convo.deleted) return;
  chats = [convo, ...chats.filter((c) => c.id !== convo.id)];
  store(CHATS, chats);
  showList();
  if (convo !== current) return;
  sessionStorage.setItem("herd.current", convo.id);
  if (shifted) showChat();  // dims the messages left out
}

async function send(text) {
  current ??= {id: Date.now().toString(36) + Math.random().toString(36).slice(2), title: text.slice(0, 60),
               messages: [], skip: 0};
  const convo = current, user = {role: "user", content: text};
  const asked = bubble(user), out = bubble({role: "assistant", content: ""}), result = {reply: ""};
  controller = new AbortController();
  busy(true);
  try {
    if (!models.length) await loadModels();  // e.g. once an API key has been entered
    const skip = await reply(convo, text, out, result);
    const message = {role: "assistant", content: result.reply, note: describe(result, convo, skip)};
    if (message.note) note(out, message.note);
    keep(convo, user, message, skip);
  } catch (e) {
    if (e.name === "AbortError" && result.reply) {
      out.firstChild.replaceChildren(render(result.reply));
      note(out, "(stopped)");
      keep(convo, user, {role: "assistant", content: result.reply, note: "(stopped)"}, convo.skip);
    } else {
      asked.classList.add("failed");
      out.classList.add("error");
      out.firstChild.textContent = e.name === "AbortError" ? "(stopped before a reply)" : "Error: " + e.message;
      note(out, "This message was left out of the conversation: edit it and send it again, or send another.");
      if (!$("input").value) $("input").value = text;
    }
  } finally {
    controller = null;
    busy(false);
    out.dataset.done = "true";
  }
}

function open(convo) {
  if (controller) controller.abort();
  current = convo;
  sessionStorage.setItem("herd.current", convo ? convo.id : "");
  showChat();
  document.body.classList.remove("chats-open");
  $("input").focus();
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => open(null));
$("chats-toggle").addEventListener("click", () => document.body.classList.toggle("chats-open"));
$("chats").addEventListener("click", (e) => {
  const button = e.target.closest("button"), li = e.target.closest("li");
  if (!button || !li) return;
  const convo = chats.find((c) => c.id === li.dataset.id);
  if (button.classList.contains("open")) return open(convo);
  convo.deleted = true;
  chats = chats.filter((c) => c !== convo);
  store(CHATS, chats);
  showList();
  if (convo === current) open(null);
});
$("messages").addEventListener("click", async (e) => {
  const button = e.target.closest("button.copy");
  if (!button) return;
  await copy(button.closest(".code").querySelector("pre").textContent);
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
});
for (const k of KEPT) $(k).addEventListener("change", saveSettings);
window.addEventListener("storage", (e) => {  // another tab changed the conversations
  if (e.key !== CHATS || controller) return;
  chats = load(CHATS, []);
  current = current && (chats.find((c) => c.id === current.id) ?? null);
  showList();
  showChat();
});

/** Copy to the clipboard; where the Clipboard API is missing (plain http off localhost), by a selection. */
async function copy(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = document.body.appendChild(document.createElement("textarea"));
  area.value = text;
  area.select();
  document.execCommand("copy");
  area.remove();
}

restoreSettings();
current = chats.find((c) => c.id === sessionStorage.getItem("herd.current")) ?? null;  // the chat open before a reload
showList();
showChat();
loadModels();
