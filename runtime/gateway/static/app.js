// threadbound's web page: the task list (polled), one task's events streamed live over
// SSE (read with fetch, so the token goes in the Authorization header, never the URL),
// one lane per agent, a cancel button, a submit form, and a person's part: the panel
// that answers a task's open questions (or approves its change) and a message field.
// Event kinds come from /static/vocabulary.js, which the gateway writes from
// threadbound's events module. Everything the server or a model sends is shown with
// textContent, never parsed as HTML: a payload is untrusted text.
"use strict";

const K = window.THREADBOUND_KINDS;
// A person's kinds, from the vocabulary once it names them; until then, as the events
// module spells them.
const INPUT_REQUESTED = K.INPUT_REQUESTED;
const INPUT_RECEIVED = K.INPUT_RECEIVED;
const WAITING = K.WAITING;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("threadbound-token");
let following = null; // {taskId, abort, open: Map(request number -> {agent, el}), ended}

function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token }, options.headers || {});
  return fetch(path, Object.assign({}, options, { headers }));
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return resp.status + " " + resp.statusText; }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

function shown(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function taskPath(suffix) {
  return "/v1/tasks/" + encodeURIComponent(following.taskId) + suffix;
}

async function post(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function showApp() {
  $("login").hidden = !!token;
  $("app").hidden = !token;
  $("forget-token").hidden = !token;
  if (token) refreshTasks();
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem("threadbound-token", token);
  showApp();
});
$("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem("threadbound-token");
  token = null;
  showApp();
});

$("submit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = $("submit-result");
  const body = { goal: $("goal").value };
  const agents = $("agents").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (agents.length) body.agents = agents;
  const after = $("after").value.trim();
  if (after) {
    try {
      body.after = JSON.parse(after);
    } catch (err) {
      out.textContent = "after: not JSON (" + err.message + ")";
      return;
    }
    if (body.after === null || typeof body.after !== "object" || Array.isArray(body.after)) {
      out.textContent = 'after: must be a JSON object of role -> [roles it comes after], e.g. {"tester": ["coder"]}';
      return;
    }
  }
  if ($("workspace").value.trim()) body.workspace = $("workspace").value.trim();
  try {
    body.inputs = JSON.parse($("inputs").value || "{}");
  } catch (err) {
    out.textContent = "inputs: not JSON (" + err.message + ")";
    return;
  }
  const resp = await post("/v1/tasks", body);
  if (!resp.ok) { out.textContent = await errorText(resp); return; }
  const made = await resp.json();
  out.textContent = "submitted " + made.task_id;
  await refreshTasks();
  follow(made.task_id);
});

$("cancel").addEventListener("click", async () => {
  if (!following) return;
  const resp = await api(taskPath("/cancel"), { method: "POST" });
  if (!resp.ok) $("task-events").append(line("cancel: " + (await errorText(resp))));
});

$("message-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!following) return;
  const mine = following;
  const out = $("message-result");
  out.textContent = "";
  let said;
  try {
    const resp = await post(taskPath("/messages"), { message: $("message").value });  // sent as text
    said = resp.ok ? "sent" : await errorText(resp);
  } catch (err) {
    said = "not sent: " + err.message;
  }
  if (following !== mine) return;
  if (said === "sent") $("message").value = "";
  out.textContent = said;
});

// -- a person's part: one block per open request of the followed task ----------------

// POST an answer for one request; the server's message shows next to the panel. On
// success the block stays (its buttons off) until the stream brings the answer.
async function answer(block, path, body) {
  const mine = following;
  const buttons = block.querySelectorAll("button");
  buttons.forEach((b) => { b.disabled = true; });
  $("input-error").textContent = "";
  let problem = null;
  try {
    const resp = await post(path, body);
    if (!resp.ok) problem = await errorText(resp);
  } catch (err) {
    problem = "not sent: " + err.message;
  }
  if (problem === null || following !== mine) return;  // answered, or the page follows another task now
  complain(block, problem);
  buttons.forEach((b) => { b.disabled = false; });
}

function complain(block, text) {
  $("input-error").textContent = "#" + block.dataset.request + ": " + text;
}

function approvalBlock(block, req, payload) {
  const files = Array.isArray(payload.files) ? payload.files.map(shown) : [];
  block.append(
    el("h4", { textContent: "#" + req + " " + shown(payload.question || "approve this change?") }),
    el("p", { className: "files", textContent: "Files: " + (files.join(", ") || "none") }));
  if (Array.isArray(payload.refused) && payload.refused.length) {
    block.append(el("p", { className: "refused",
                           textContent: "Not applied: " + payload.refused.map(shown).join("; ") }));
  }
  if (payload.apply === false) {
    block.append(el("p", { className: "muted", textContent: "The task was not asked to apply: approving ends it "
                                                            + "succeeded without writing the files." }));
  }
  block.append(el("pre", { className: "diff", textContent: shown(payload.diff || "(no diff)") }));
  const reason = el("input", { className: "reason", placeholder: "why (optional)" });
  const feedback = el("input", { className: "feedback", placeholder: "what to change in another round" });
  const approve = el("button", { type: "button", className: "approve", textContent: "Approve" });
  const reject = el("button", { type: "button", className: "reject", textContent: "Reject" });
  const sendBack = el("button", { type: "button", className: "send-back", textContent: "Send back with feedback" });
  approve.addEventListener("click", () => answer(block, taskPath("/approve"), { request: req }));
  reject.addEventListener("click", () => {
    const body = { request: req };
    if (reason.value.trim()) body.reason = reason.value.trim();
    answer(block, taskPath("/reject"), body);
  });
  // {"feedback": text}, not the bare text: a bare "yes" or "no" would count as a verdict.
  sendBack.addEventListener("click", () => {
    if (!feedback.value.trim()) { complain(block, "say what to change before sending it back"); return; }
    answer(block, taskPath("/respond"), { value: { feedback: feedback.value.trim() }, request: req });
  });
  block.append(el("div", { className: "row" }, approve),
               el("div", { className: "row" }, reason, reject),
               el("div", { className: "row" }, feedback, sendBack));
}

function questionBlock(block, req, agent, payload) {
  const question = typeof payload === "string" ? payload
    : (payload && typeof payload.question === "string" ? payload.question : "a question");
  block.append(
    el("h4", { textContent: "#" + req + (agent ? " from " + agent : "") + ": " + question }),
    el("pre", { className: "payload", textContent: JSON.stringify(payload, null, 2) }));
  const field = el("textarea", { className: "answer", rows: 2, placeholder: "your answer" });
  const respond = el("button", { type: "button", className: "respond", textContent: "Respond" });
  respond.addEventListener("click", () => {
    const text = field.value;
    if (!text.trim()) { complain(block, "type an answer first"); return; }
    let value;
    try { value = JSON.parse(text); } catch (err) { value = text; }
    answer(block, taskPath("/respond"), { value, request: req });
  });
  block.append(field, el("p", { className: "hint muted", textContent:
    'Sent as JSON when it parses as JSON ({"db": "postgres"}, 3, true, "quoted"); otherwise as text.' }), respond);
}

function opened(ev) {
  const d = ev.data || {};
  const req = d.request;
  if (!following || following.ended || following.open.has(req)) return;
  const payload = d.payload;
  const block = el("div", { className: "request" });
  block.dataset.request = String(req);
  if (payload && typeof payload === "object" && payload.kind === "approval" && !ev.agent) {
    approvalBlock(block, req, payload);
  } else {
    questionBlock(block, req, ev.agent, payload);
  }
  following.open.set(req, { agent: ev.agent, el: block });
  $("input-requests").append(block);
  showOpen();
}

function closed(req) {
  const entry = following && following.open.get(req);
  if (!entry) return;
  entry.el.remove();
  following.open.delete(req);
  showOpen();
}

// The panel shows while a request is open; a lane shows "waiting" while its agent has one.
function showOpen() {
  const open = following ? [...following.open.values()] : [];
  $("input-panel").hidden = open.length === 0;
  document.querySelectorAll(".lane").forEach((laneEl) => {
    const waits = open.some((o) => o.agent === laneEl.dataset.agent);
    laneEl.classList.toggle("waiting", waits);
    laneEl.querySelector(".lane-status").textContent = waits ? WAITING : "";
  });
}

function ended() {
  following.ended = true;
  for (const req of [...following.open.keys()]) closed(req);
  $("cancel").hidden = true;
  $("message-form").hidden = true;
}

function line(text) {
  const li = document.createElement("li");
  li.textContent = text;
  return li;
}

async function refreshTasks() {
  if (!token) return;
  let resp;
  try { resp = await api("/v1/tasks?limit=500"); } catch (e) { $("pool-status").textContent = "gateway unreachable"; return; }
  if (resp.status === 401) { $("pool-status").textContent = await errorText(resp); return; }
  if (!resp.ok) return;
  $("pool-status").textContent = "";
  const page = await resp.json();
  const body = $("tasks").tBodies[0];
  const rows = page.tasks.slice().reverse();
  body.replaceChildren(...rows.map((t) => {
    const tr = document.createElement("tr");
    tr.dataset.taskId = t.task_id;
    if (following && following.taskId === t.task_id) tr.classList.add("selected");
    for (const [text, cls] of [[t.task_id, ""], [t.status, "status " + t.status], [t.agents.join(", "), ""],
                               [t.goal.slice(0, 60), ""]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    tr.addEventListener("click", () => follow(t.task_id));
    return tr;
  }));
}

function lane(agent) {
  let found = document.querySelector('.lane[data-agent="' + CSS.escape(agent) + '"]');
  if (!found) {
    found = el("div", { className: "lane" },
               el("h3", {}, agent + " ", el("span", { className: "lane-status status " + WAITING })),
               el("pre", { className: "tokens" }),
               el("ul", { className: "events" }));
    found.dataset.agent = agent;
    $("lanes").append(found);
  }
  return found;
}

function brief(ev) {
  const d = ev.data || {};
  const bits = [];
  for (const key of ["round", "attempt", "reason", "error", "limit_s",
                     "request", "requests", "n", "message", "value"]) {
    if (d[key] !== undefined && d[key] !== null) bits.push(key + "=" + shown(d[key]).slice(0, 80));
  }
  return "#" + ev.offset + " " + ev.kind + (bits.length ? " " + bits.join(" ") : "");
}

function render(ev) {
  if (K.TERMINAL.includes(ev.kind) || K.STATUSES.includes(ev.kind)) {
    $("view-status").textContent = ev.kind;
    $("view-status").className = "status " + ev.kind;
  }
  if (ev.agent) {
    const laneEl = lane(ev.agent);
    if (ev.kind === K.TOKENS || ev.kind === K.MESSAGE) {
      laneEl.querySelector(".tokens").append(document.createTextNode(ev.data.text || ""));
    } else {
      laneEl.querySelector(".events").append(line(brief(ev)));
    }
  } else {
    $("task-events").append(line(brief(ev)));
  }
  if (ev.kind === INPUT_REQUESTED) opened(ev);
  else if (ev.kind === INPUT_RECEIVED) closed((ev.data || {}).request);
  else if (K.TERMINAL.includes(ev.kind)) ended();
}

async function follow(taskId) {
  if (following) following.abort.abort();
  const abort = new AbortController();
  following = { taskId, abort, open: new Map(), ended: false };
  $("no-task").hidden = true;
  $("task-view").hidden = false;
  $("view-id").textContent = taskId;
  $("view-status").textContent = "";
  $("lanes").replaceChildren();
  $("task-events").replaceChildren();
  $("input-requests").replaceChildren();
  $("input-panel").hidden = true;
  $("input-error").textContent = "";
  $("message-result").textContent = "";
  $("cancel").hidden = false;
  $("message-form").hidden = false;
  document.querySelectorAll("#tasks tbody tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.taskId === taskId));
  let last = -1, delay = 250;
  while (!abort.signal.aborted) {
    try {
      const resp = await api("/v1/tasks/" + encodeURIComponent(taskId) + "/events",
                             { headers: { "Last-Event-ID": String(last) }, signal: abort.signal });
      if (resp.status >= 400 && resp.status < 500 && resp.status !== 429) {
        $("task-events").append(line(await errorText(resp)));
        return;
      }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
          if (!data.length || frame.split("\n").some((l) => l === "event: error")) continue;
          const ev = JSON.parse(data.join("\n"));
          if (ev.offset <= last) continue;
          last = ev.offset;
          delay = 250;
          render(ev);
          if (K.TERMINAL.includes(ev.kind)) { refreshTasks(); return; }
        }
      }
    } catch (err) {
      if (abort.signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, delay));  // the stream broke: resume after the last offset
    delay = Math.min(delay * 2, 5000);
  }
}

setInterval(refreshTasks, 1000);
showApp();
