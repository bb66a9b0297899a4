"""The tool-using coder: its tools on a hostile copy, and its loop through a real pool with
scripted tool-calling models (the simulated backend, a callable one in the plain-text
protocol, and the local OpenAI-compatible server streaming tool_calls deltas), on a
workspace larger than the whole-file coder's context budget, where the fix is in a file
that coder leaves out."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
from openai_server import OpenAITestServer

from threadbound.agents import builtin, tool_coder
from threadbound.agents.base import StepContext
from threadbound.agents.models import SimulatedModel, SimulatedModelConfig
from threadbound.agents.sandbox import SandboxSettings
from threadbound.agents.tool_calls import MAX_READ_LINES, MAX_RESULT_CHARS, ToolCallError, parse_arguments
from threadbound.agents.tools import Toolbox
from threadbound.agents.workspace import Workspace

BUG_OLD = "    return price * qty * 2  # BUG: double charge\n"
BUG_NEW = "    return price * qty\n"
SPEC = json.dumps({"pattern": "* qty * 2", "old": BUG_OLD, "new": BUG_NEW})
GOAL = "make the failing test pass\nSPEC: " + SPEC


def big_repo(root: Path) -> Path:
    """Ten filler modules (26 KB, read first in path order) and the bug in pkg/zz_billing.py,
    which the whole-file coder's 24,000-character prompt leaves out."""
    pkg = root / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for i in range(10):
        body = "".join(f"def helper_{i}_{j}(x):\n    return x + {j}  # padding {'.' * 20}\n\n" for j in range(40))
        (pkg / f"a_filler_{i:02d}.py").write_text(body[:2600])
    billing = "".join(f"def other_{j}(x):\n    return x * {j}\n\n" for j in range(150))
    billing += "def total(price, qty):\n" + BUG_OLD
    (pkg / "zz_billing.py").write_text(billing)
    (root / "test_billing.py").write_text(textwrap.dedent("""\
        from pkg.zz_billing import total


        def test_total():
            assert total(3, 4) == 12
    """))
    return root


@pytest.fixture
def repo(tmp_path):
    return big_repo(tmp_path / "repo")


@pytest.fixture
def box(repo, tmp_path):
    ws = Workspace.for_task("tool-unit", str(repo), root=tmp_path / "copies")
    return Toolbox(ws, test_command=list(builtin.DEFAULT_TEST_COMMAND), test_env=builtin.DEFAULT_TEST_ENV,
                   settings=SandboxSettings().hiding(str(repo), str(tmp_path / "copies")))


def test_the_whole_file_coder_would_not_see_the_file_to_fix(repo, tmp_path):
    ws = Workspace.for_task("tool-premise", str(repo), root=tmp_path / "copies")
    assert sum(len(t) for t in ws.texts().values()) > builtin.MAX_CONTEXT_CHARS
    assert "(pkg/zz_billing.py omitted: context budget)" in builtin._files_block(ws)


# -- the tools, on a hostile copy ---------------------------------------------------------

def test_search_read_replace_and_run_tests_fix_the_bug(box):
    found = box.call("search", json.dumps({"pattern": "* qty * 2"}))
    assert found.ok and found.output.startswith("pkg/zz_billing.py:")
    line = int(found.output.split(":")[1])
    read = box.call("read_file", json.dumps({"path": "pkg/zz_billing.py", "start_line": line, "end_line": line}))
    assert read.output.startswith(f"{line}  " + BUG_OLD.rstrip("\n"))
    assert not box.call("run_tests", "{}").sandbox["ok"]
    assert box.call("replace", json.dumps({"path": "pkg/zz_billing.py", "old_text": BUG_OLD, "new_text": BUG_NEW})).ok
    tests = box.call("run_tests", "{}")
    assert tests.sandbox["ok"] and tests.output.startswith("tests passed: 1 passed")
    assert box.ws.changed() == ["pkg/zz_billing.py"]
    assert (box.stats.sandbox_runs, box.stats.test_runs, box.stats.refused_paths) == (2, 2, 0)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "pkg/../../outside.txt"])
def test_a_path_outside_the_copy_is_refused_and_counted(box, path):
    for name, args in (("read_file", {"path": path}), ("create_file", {"path": path, "content": "x"}),
                       ("replace", {"path": path, "old_text": "a", "new_text": "b"})):
        result = box.call(name, json.dumps(args))
        assert not result.ok and result.refused_path and "leaves the workspace" in result.output
    assert box.stats.refused_paths == 3 and box.stats.tool_errors == 3


def test_a_symlink_in_the_copy_is_never_followed(box, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET\n")
    os.symlink(secret, box.ws.path / "leak.txt")
    os.symlink(tmp_path, box.ws.path / "outdir")
    for name, args in (("read_file", {"path": "leak.txt"}), ("read_file", {"path": "outdir/secret.txt"}),
                       ("replace", {"path": "leak.txt", "old_text": "TOP", "new_text": "x"}),
                       ("create_file", {"path": "outdir/new.txt", "content": "x"})):
        result = box.call(name, json.dumps(args))
        assert not result.ok and result.refused_path and "symbolic link" in result.output, (name, result)
        assert "TOP SECRET" not in result.output
    listing = box.call("list_files", "{}").output
    assert "leak.txt  (a symbolic link: not readable)" in listing
    assert "TOP SECRET" not in box.call("search", json.dumps({"pattern": "SECRET"})).output
    assert secret.read_text() == "TOP SECRET\n" and not (tmp_path / "new.txt").exists()
    assert box.stats.refused_paths == 4


def test_huge_files_and_outputs_are_bounded_and_counted(box):
    (box.ws.path / "huge.txt").write_text("x" * 300_000)
    (box.ws.path / "long.txt").write_text("".join(f"line {n}\n" for n in range(5000)))
    huge = box.call("read_file", json.dumps({"path": "huge.txt"}))
    assert not huge.ok and huge.bounded and "larger than 200000 bytes" in huge.output
    long = box.call("read_file", json.dumps({"path": "long.txt"}))
    assert long.ok and long.bounded and f"lines 1-{MAX_READ_LINES} of 5000 shown" in long.output
    flood = box.call("run", json.dumps({"command": "yes 0123456789 | head -c 300000"}))
    assert flood.ok and flood.bounded and len(flood.output) < MAX_RESULT_CHARS + 200
    assert "characters elided" in flood.output
    assert box.stats.bounded == 3 and box.stats.sandbox_runs == 1


def test_a_command_runs_in_the_sandbox_not_on_the_host(box, tmp_path):
    marker = tmp_path / "host-marker"
    result = box.call("run", json.dumps({"command": f"echo hi > {marker}; ls pkg | head -2; echo made > new.txt"}))
    assert result.ok and result.sandbox["isolation"] == "required"
    assert "__init__.py\na_filler_00.py" in result.output  # it runs in the copy...
    assert not marker.exists()  # ...and the host's directories are read-only in there
    assert box.ws.read("new.txt") == "made\n"  # a command may edit the copy, as a shell agent does


@pytest.mark.parametrize("name, arguments, says", [
    ("read_file", "{not json", "not valid JSON"),
    ("read_file", "[1, 2]", "must be a JSON object"),
    ("read_file", "{}", "needs the argument 'path'"),
    ("read_file", '{"path": "a.py", "lines": 3}', "has no argument 'lines'"),
    ("read_file", '{"path": 7}', "must be a string"),
    ("read_file", '{"path": "x.py", "start_line": true}', "must be a integer"),
    ("rm_rf", "{}", "there is no tool 'rm_rf'"),
    ("replace", '{"path": "pkg/zz_billing.py", "old_text": "return", "new_text": "x"}', "occurs 151 times"),
    ("replace", '{"path": "pkg/zz_billing.py", "old_text": "nowhere", "new_text": "x"}', "does not occur"),
    ("create_file", '{"path": "pkg/zz_billing.py", "content": ""}', "exists"),
    ("read_file", '{"path": "nope.py"}', "does not exist"),
    ("search", '{"pattern": "(", "regex": true}', "not a valid regular expression"),
])
def test_bad_arguments_are_a_tool_error_for_the_model_never_an_exception(box, name, arguments, says):
    result = box.call(name, arguments)
    assert not result.ok and says in result.output and not result.refused_path
    assert box.stats.tool_errors == 1


def test_argument_schema_errors_name_the_field():
    with pytest.raises(ToolCallError, match="'pattern'"):
        parse_arguments("search", "{}")


# -- the loop, without Ray --------------------------------------------------------------

def scripted_turns(*calls):
    return [{"text": f"step {i}", "tool_calls": [{"name": n, "arguments": a}]} for i, (n, a) in enumerate(calls)]


FIX = [("search", {"pattern": "* qty * 2"}),
       ("read_file", {"path": "pkg/zz_billing.py", "start_line": 300, "end_line": 305}),
       ("replace", {"path": "pkg/zz_billing.py", "old_text": BUG_OLD, "new_text": BUG_NEW}),
       ("run_tests", {}), ("finish", {"summary": "removed the double charge"})]


def run_step(repo, turns, level=2, streaming=True, **inputs):
    model = SimulatedModel(SimulatedModelConfig(turns={"coder": turns}))
    ctx = StepContext(task_id=f"loop-{os.getpid()}-{len(turns)}-{level}", role="coder", goal="fix", workspace=str(repo),
                      level=level, model=model, inputs=inputs, streaming=streaming)
    gen = tool_coder.Coder().step(ctx)
    tokens = []
    try:
        while True:
            tokens.append(next(gen))
    except StopIteration as stop:
        out = stop.value
    Workspace.discard(ctx.task_id)
    return out, ctx.sink, tokens


def test_the_loop_stops_at_its_tool_call_bound_and_keeps_the_change(repo):
    looping = FIX[:3] + [("list_files", {})]  # never finishes: the last turn repeats
    out, events, _ = run_step(repo, scripted_turns(*looping), max_tool_calls=6)
    assert out["stopped"] == "tool_calls" and out["tool_calls"] == 6
    assert out["changed"] == ["pkg/zz_billing.py"]
    assert [d["n"] for k, d in events if k == "tool_call"] == [1, 2, 3, 4, 5, 6]


def test_the_level_sets_the_bounds_and_a_bad_bound_input_names_itself(repo):
    out, _, _ = run_step(repo, scripted_turns(("list_files", {})), level=1)
    assert (out["stopped"], out["tool_calls"]) == ("tool_calls", tool_coder.STEP_BOUNDS[1].max_tool_calls)
    with pytest.raises(builtin.TaskInputError, match="inputs.max_tool_calls"):
        run_step(repo, scripted_turns(("list_files", {})), max_tool_calls="many")


def test_without_streaming_each_turn_comes_whole_and_the_loop_still_fixes_the_bug(repo):
    out, events, tokens = run_step(repo, scripted_turns(*FIX), streaming=False)
    assert tokens == [f"step {i}" for i in range(5)]  # one whole answer per turn
    assert out["stopped"] == "finish" and out["changed"] == ["pkg/zz_billing.py"] and out["test_runs"] == 1
    assert [d["name"] for k, d in events if k == "tool_result" and d["ok"]] == [name for name, _ in FIX]


def test_the_loop_stops_at_its_token_bound(repo):
    chatty = [{"text": "word " * 50, "tool_calls": [{"name": "list_files", "arguments": {}}]}]
    out, _, tokens = run_step(repo, chatty, max_step_tokens=120)
    assert out["stopped"] == "tokens" and out["tokens"] >= 120 and out["turns"] == 3
    assert "".join(tokens).startswith("word word")


# -- through a real pool ------------------------------------------------------------------

def pool_with(name, model, **cfg):
    from threadbound.runtime import AgentPool, RuntimeConfig

    return AgentPool(RuntimeConfig.from_mapping({
        "name": name, "max_agents": 3, "max_agents_per_task": 3, "step_timeout_s": 90, "task_timeout_s": 240,
        "model": model, "metrics": {"port": 0}, "retry": {"max_attempts": 1}, **cfg}))


def run_task(pool, repo, goal=GOAL, **task):
    from threadbound.runtime import Task

    handle = pool.submit(Task(goal=goal, workspace=repo, **task))
    result = handle.result(timeout=240)
    return result, list(handle.stream())


@pytest.mark.usefixtures("ray_session")
def test_the_tool_coder_fixes_a_file_the_whole_file_coder_drops_with_hostile_calls_along_the_way(repo, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep out\n")
    os.symlink(outside, repo / "leak.txt")
    (repo / "huge.log").write_text("y" * 300_000)
    hostile = [("read_file", {"path": "../../etc/passwd"}), ("read_file", {"path": "/etc/passwd"}),
               ("read_file", {"path": "leak.txt"}), ("read_file", {"path": "huge.log"}),
               ("run", {"command": "yes overflow | head -c 500000"}), ("read_file", "{broken json")]
    turns = scripted_turns(*hostile, *FIX)
    pool = pool_with("toolsim", {"backend": "simulated", "turns": {"coder": turns},
                                 "answers": {"reviewer": "Fine.\nVERDICT: APPROVE"}})
    try:
        result, events = run_task(pool, repo, max_rounds=1, inputs={"apply": True})
    finally:
        pool.shutdown()
    assert result.ok, result
    coder = result.outputs["coder"]
    assert coder["stopped"] == "finish" and coder["changed"] == ["pkg/zz_billing.py"]
    assert (coder["refused_paths"], coder["bounded"], coder["tool_errors"]) == (3, 2, 5)
    assert coder["tool_calls"] == 11 and coder["sandbox_runs"] == 2
    kinds = [e.kind for e in events if e.agent == "coder"]
    assert kinds.count("tool_call") == kinds.count("tool_result") == 11
    assert kinds.index("tokens") < kinds.index("tool_call")  # the model's words stream before its first call
    calls = [e.data["name"] for e in events if e.kind == "tool_call"]
    assert calls[-5:] == ["search", "read_file", "replace", "run_tests", "finish"]
    results = [e.data for e in events if e.kind == "tool_result"]
    assert "not valid JSON" in results[5]["output"] and results[5]["ok"] is False
    assert [e.data["ok"] for e in events if e.kind == "test_result"] == [True]
    assert result.applied == ["pkg/zz_billing.py"] and BUG_NEW in (repo / "pkg" / "zz_billing.py").read_text()
    assert outside.read_text() == "keep out\n"


@pytest.mark.usefixtures("ray_session")
def test_the_openai_backend_streams_tool_calls_from_the_server_and_the_task_succeeds(repo):
    from tool_scripts import server_script

    with OpenAITestServer(script=server_script) as srv:
        pool = pool_with("toolhttp", {"backend": "openai", "base_url": srv.url, "model": "m"})
        try:
            result, events = run_task(pool, repo, max_rounds=1)
        finally:
            pool.shutdown()
        coder_requests = [r["body"] for r in srv.requests if r["body"].get("tools")]
    assert result.ok, result
    coder = result.outputs["coder"]
    assert coder["protocol"] == "tools" and coder["stopped"] == "finish" and coder["tool_calls"] == 5
    assert coder["prompt_tokens"] > 0  # the server's usage, asked for with stream_options
    assert all(b["stream_options"] == {"include_usage": True} for b in coder_requests)
    # The second request carries the first call back as OpenAI expects: the assistant's
    # tool_calls, then a tool message answering its id.
    second = coder_requests[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "search"
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == second[-2]["tool_calls"][0]["id"]
    assert [e.data["name"] for e in events if e.kind == "tool_call"] == [
        "search", "read_file", "replace", "run_tests", "finish"]


@pytest.mark.usefixtures("ray_session")
def test_a_model_without_tool_calling_uses_the_text_protocol(repo):
    pool = pool_with("tooltext", {"backend": "callable", "callable": "tool_scripts:text_fixer"})
    try:
        result, events = run_task(pool, repo, agents=["coder", "tester"], max_rounds=1)
    finally:
        pool.shutdown()
    assert result.ok, result
    coder = result.outputs["coder"]
    assert coder["protocol"] == "text" and coder["stopped"] == "finish" and coder["changed"] == ["pkg/zz_billing.py"]
    assert [e.data["name"] for e in events if e.kind == "tool_call"] == [
        "search", "read_file", "replace", "run_tests", "finish"]


@pytest.mark.usefixtures("ray_session")
def test_the_whole_file_coder_keeps_its_own_role_name(tmp_path):
    ws = tmp_path / "fizz"
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "fizzbuzz", ws)
    fixed = (ws / "fizzbuzz.py").read_text().replace("return n\n", "return str(n)\n")
    answer = f"```python fizzbuzz.py\n{fixed}```"
    pool = pool_with("wholefile", {"backend": "simulated", "answers": {"coder-wholefile": answer}})
    try:
        result, _ = run_task(pool, ws, goal="fix", agents=["coder-wholefile"], max_rounds=1)
    finally:
        pool.shutdown()
    assert result.ok and result.outputs["coder-wholefile"]["changed"] == ["fizzbuzz.py"]
