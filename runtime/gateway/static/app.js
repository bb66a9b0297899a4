// threadbound's web page: the task list (polled), one task's events streamed live over
// SSE (read with fetch, so the token goes in the Authorization header, never the URL),
// one lane per agent, a cancel button and a submit form. Event kinds come from
// /static/vocabulary.js, which the gateway writes from threadbound's events module.
"use strict";

const K = window.THREADBOUND_KINDS;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("threadbound-token");
let following = null; // {taskId, abort}

function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token }, options.headers || {});
  return fetch(path, Object.assign({}, options, { headers }));
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return resp.status + " " + resp.statusText; }
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
  if ($("workspace").value.trim()) body.workspace = $("workspace").value.trim();
  try {
    body.inputs = JSON.parse($("inputs").value || "{}");
  } catch (err) {
    out.textContent = "inputs: not JSON (" + err.message + ")";
    return;
  }
  const resp = await api("/v1/tasks", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!resp.ok) { out.textContent = await errorText(resp); return; }
  const made = await resp.json();
  out.textContent = "submitted " + made.task_id;
  await refreshTasks();
  follow(made.task_id);
});

$("cancel").addEventListener("click", async () => {
  if (!following) return;
  const resp = await api("/v1/tasks/" + encodeURIComponent(following.taskId) + "/cancel", { method: "POST" });
  if (!resp.ok) $("task-events").append(line("cancel: " + (await errorText(resp))));
});

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
  let el = document.querySelector('.lane[data-agent="' + CSS.escape(agent) + '"]');
  if (!el) {
    el = document.createElement("div");
    el.className = "lane";
    el.dataset.agent = agent;
    const h = document.createElement("h3");
    h.textContent = agent;
    const pre = document.createElement("pre");
    pre.className = "tokens";
    const ul = document.createElement("ul");
    ul.className = "events";
    el.append(h, pre, ul);
    $("lanes").append(el);
  }
  return el;
}

function brief(ev) {
  const d = ev.data || {};
  const bits = [];
  for (const key of ["round", "attempt", "reason", "error", "limit_s"]) {
    if (d[key] !== undefined && d[key] !== null) bits.push(key + "=" + String(d[key]).slice(0, 80));
  }
  return "#" + ev.offset + " " + ev.kind + (bits.length ? " " + bits.join(" ") : "");
}

function render(ev) {
  if (K.TERMINAL.includes(ev.kind) || K.STATUSES.includes(ev.kind)) {
    $("view-status").textContent = ev.kind;
    $("view-status").className = "status " + ev.kind;
  }
  if (!ev.agent) { $("task-events").append(line(brief(ev))); return; }
  const el = lane(ev.agent);
  if (ev.kind === K.TOKENS || ev.kind === K.MESSAGE) {
    el.querySelector(".tokens").append(document.createTextNode(ev.data.text || ""));
  } else {
    el.querySelector(".events").append(line(brief(ev)));
  }
}

async function follow(taskId) {
  if (following) following.abort.abort();
  const abort = new AbortController();
  following = { taskId, abort };
  $("no-task").hidden = true;
  $("task-view").hidden = false;
  $("view-id").textContent = taskId;
  $("view-status").textContent = "";
  $("lanes").replaceChildren();
  $("task-events").replaceChildren();
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
