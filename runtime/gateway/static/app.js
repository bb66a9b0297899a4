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

// The one escaping function for text that did not come from the page itself: control
// characters (C0 but newline and tab, DEL, C1), bidirectional controls (U+202A-202E,
// U+2066-2069, U+200E/200F, U+061C) and invisible ones (zero-width, U+2060, U+FEFF) are
// shown as <U+202E>, as the terminal shows them, so a diff cannot read as other code
// than the code that runs (Trojan Source). Shown with textContent: never HTML.
const HIDDEN = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]/g;
function visible(text) {
  return String(text).replace(HIDDEN, (c) => "<U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") + ">");
}

function shown(value) {
  return visible(typeof value === "string" ? value : JSON.stringify(value));
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
  $("login-error").textContent = "";
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
  $("input-error").textContent = "#" + block.dataset.request + ": " + visible(text);
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
  const tests = el("div", { className: "approval-tests" });
  showTests(tests);
  block.append(tests, el("pre", { className: "diff", textContent: shown(payload.diff || "(no diff)") }));
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
    el("h4", { textContent: "#" + req + (agent ? " from " + visible(agent) : "") + ": " + visible(question) }),
    el("pre", { className: "payload", textContent: visible(JSON.stringify(payload, null, 2)) }));
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
  if (resp.status === 401) {  // a token this gateway does not know: back to the login form, saying so
    const why = await errorText(resp);
    sessionStorage.removeItem("threadbound-token");
    token = null;
    showApp();
    $("login-error").textContent = "That token was refused: " + why;
    return;
  }
  if (!resp.ok) return;
  $("pool-status").textContent = "";
  const page = await resp.json();
  const body = $("tasks").tBodies[0];
  const rows = page.tasks.slice().reverse();
  body.replaceChildren(...rows.map((t) => {
    const tr = document.createElement("tr");
    tr.dataset.taskId = t.task_id;
    if (following && following.taskId === t.task_id) tr.classList.add("selected");
    for (const [text, cls] of [[visible(t.task_id), ""], [t.status, "status " + t.status],
                               [visible(t.agents.join(", ")), ""], [visible(t.goal.slice(0, 60)), ""]]) {
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
               el("h3", {}, visible(agent) + " ", el("span", { className: "lane-status status " + WAITING })),
               el("div", { className: "steps" }),
               el("ul", { className: "events" }));
    found.dataset.agent = agent;
    $("lanes").append(found);
  }
  return found;
}

// Each step of an agent (a round, or a retry's attempt) gets a block of its own in the
// lane: its heading, its streamed text, and its test results as results.
function step(laneEl, ev) {
  const steps = laneEl.querySelector(".steps");
  const d = (ev && ev.data) || {};
  if (ev || !steps.lastElementChild) {
    const title = "round " + shown(d.round === undefined ? "?" : d.round)
      + (d.attempt && d.attempt > 1 ? " · attempt " + shown(d.attempt) : "");
    steps.append(el("div", { className: "step" }, el("h4", { className: "step-title", textContent: title }),
                    el("pre", { className: "tokens" })));
  }
  return steps.lastElementChild;
}

// "3 passed · 1 failed · 0 errors — FAIL", from a test_result event (or a tester's output)
function testSummary(d) {
  const n = (k) => (typeof d[k] === "number" ? d[k] : 0);
  let text = n("passed") + " passed · " + n("failed") + " failed · " + n("errors") + " errors";
  if (typeof d.skipped === "number") text += " · " + d.skipped + " skipped";
  text += d.ok ? " — PASS" : " — FAIL";
  if (d.killed) text += " (killed: " + shown(d.killed) + ")";
  if (typeof d.summary === "string" && d.summary) text += " (" + visible(d.summary) + ")";
  return text;
}

function testResult(laneEl, ev) {
  const d = ev.data || {};
  step(laneEl, null).append(el("p", { className: "test-result " + (d.ok ? "pass" : "fail"),
                                      textContent: testSummary(d) }));
  if (following) following.tests = Object.assign({}, following.tests, { [ev.agent]: d });
  document.querySelectorAll("#input-panel .approval-tests").forEach(showTests);
}

function showTests(box) {
  const tests = (following && following.tests) || {};
  const names = Object.keys(tests);
  box.replaceChildren(...(names.length
    ? names.map((a) => el("p", { className: "test-result " + (tests[a].ok ? "pass" : "fail"),
                                 textContent: "Tests (" + visible(a) + "): " + testSummary(tests[a]) }))
    : [el("p", { className: "muted", textContent: "Tests: no results in this task's log" })]));
}

// The final status, its reason and error, under the task's heading.
async function showFinal(ev) {
  const mine = following;
  const d = ev.data || {};
  let reason = d.reason, error = d.error;
  try {
    const resp = await api("/v1/tasks/" + encodeURIComponent(mine.taskId));
    if (resp.ok) {
      const task = await resp.json();
      const r = task.result || {};
      reason = r.reason || reason;
      error = r.error || task.error || error;
    }
  } catch (err) { /* the event's own data is shown */ }
  if (following !== mine) return;
  $("final").hidden = false;
  $("final").className = "final status " + ev.kind;
  $("final").textContent = "Final: " + ev.kind + (reason ? " — reason: " + shown(reason) : "")
    + (error ? " — " + shown(error) : "");
}

function brief(ev) {
  const d = ev.data || {};
  const bits = [];
  for (const key of ["round", "attempt", "reason", "error", "limit_s",
                     "request", "requests", "n", "message", "value"]) {
    if (d[key] !== undefined && d[key] !== null) bits.push(key + "=" + shown(d[key]).slice(0, 120));
  }
  return "#" + ev.offset + " " + visible(ev.kind) + (bits.length ? " " + bits.join(" ") : "");
}

function render(ev) {
  if (K.TERMINAL.includes(ev.kind) || K.STATUSES.includes(ev.kind)) {
    $("view-status").textContent = ev.kind;
    $("view-status").className = "status " + ev.kind;
  }
  if (ev.agent) {
    const laneEl = lane(ev.agent);
    if (ev.kind === K.STEP_STARTED) {
      step(laneEl, ev);
      laneEl.querySelector(".events").append(line(brief(ev)));
    } else if (ev.kind === K.TOKENS || ev.kind === K.MESSAGE) {
      step(laneEl, null).querySelector(".tokens").append(document.createTextNode(visible(ev.data.text || "")));
    } else if (ev.kind === K.TEST_RESULT) {
      testResult(laneEl, ev);
    } else {
      laneEl.querySelector(".events").append(line(brief(ev)));
    }
  } else {
    $("task-events").append(line(brief(ev)));
  }
  if (ev.kind === INPUT_REQUESTED) opened(ev);
  else if (ev.kind === INPUT_RECEIVED) closed((ev.data || {}).request);
  else if (K.TERMINAL.includes(ev.kind)) { ended(); showFinal(ev); }
}

async function follow(taskId) {
  if (following) following.abort.abort();
  const abort = new AbortController();
  following = { taskId, abort, open: new Map(), ended: false, tests: {} };
  $("final").hidden = true;
  $("final").textContent = "";
  $("no-task").hidden = true;
  $("task-view").hidden = false;
  $("view-id").textContent = visible(taskId);
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
        $("task-events").append(line(visible(await errorText(resp))));
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
