"""The tool-using coder on five small repositories, each with a planted bug.

    python scripts/bench_coder.py

Each repository is generated under a temporary directory: a package of filler modules
(over 24,000 characters in all, read first in path order) and one module with a planted
bug, a test that fails until it is fixed. The whole-file coder (``coder-wholefile``)
puts at most 24,000 characters of a workspace into its prompt, so the module to fix is
left out of it ("omitted: context budget"); the table says so per repository.

The model is scripted and deterministic, a tool-calling one (a ``callable`` backend with
``tools: true``): it reads what to fix from the task's goal (the planted bug's text and
its fix, after ``SPEC:``), then works as a coding agent does: it greps for the bug, reads
the lines around the match, replaces the span, runs the tests, and finishes. Each task
runs the ``coder`` then the ``tester`` through a real pool on a local Ray; commands and
tests run in the sandbox. Per coder step the table prints: tool calls, tokens, wall
time, sandbox runs, whether the tester's run then passed, and the task's success.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import time
from pathlib import Path

from local_ray import isolate

BUDGET = 24_000  # the whole-file coder's MAX_CONTEXT_CHARS

# name, module, the module's code (with the bug), the test, the buggy line, its fix
REPOS = [
    ("billing", "pricing", '''\
        def total(price, qty):
            """What qty items at price cost."""
            return price * qty * 2
        ''', "from pkg.pricing import total\n\n\ndef test_total():\n    assert total(3, 4) == 12\n",
     "    return price * qty * 2\n", "    return price * qty\n"),
    ("slugs", "slugs", '''\
        def slugify(title):
            """'Hello World' -> 'hello-world'."""
            words = title.split()
            return "-".join(words)
        ''', "from pkg.slugs import slugify\n\n\ndef test_slug():\n    assert slugify('Hello World') == 'hello-world'\n",
     '    return "-".join(words)\n', '    return "-".join(w.lower() for w in words)\n'),
    ("calendar", "years", '''\
        def is_leap(year):
            """Gregorian leap years."""
            return year % 4 == 0
        ''', "from pkg.years import is_leap\n\n\ndef test_leap():\n    assert is_leap(2000) and is_leap(2024)\n"
             "    assert not is_leap(1900) and not is_leap(2023)\n",
     "    return year % 4 == 0\n", "    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n"),
    ("stats", "stats", '''\
        def median(xs):
            """The middle value of an odd-length list."""
            ys = sorted(xs)
            return ys[len(ys) // 2 + 1]
        ''', "from pkg.stats import median\n\n\ndef test_median():\n    assert median([5, 1, 3]) == 3\n"
             "    assert median([9, 7, 1, 3, 5]) == 5\n",
     "    return ys[len(ys) // 2 + 1]\n", "    return ys[len(ys) // 2]\n"),
    ("inventory", "stock", '''\
        def restock(stock, amount):
            """Stock after a delivery of amount items."""
            return stock - amount
        ''', "from pkg.stock import restock\n\n\ndef test_restock():\n    assert restock(10, 5) == 15\n",
     "    return stock - amount\n", "    return stock + amount\n"),
]


def make_repo(root: Path, name: str, module: str, code: str, test: str) -> Path:
    """A package of filler modules (m00..m11, over BUDGET characters), the module with the
    bug, and its test at the top."""
    repo = root / name
    pkg = repo / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for i in range(12):
        funcs = [f"def {name}_helper_{i}_{j}(value, scale={j + 1}):\n"
                 f"    \"\"\"Filler {i}.{j}: scales and offsets a value.\"\"\"\n"
                 f"    return value * scale + {i * j}\n\n\n" for j in range(20)]
        (pkg / f"m{i:02d}.py").write_text("".join(funcs))
    # The module to fix is large too (its other functions first), so what the fillers leave of
    # the whole-file coder's budget cannot hold it.
    others = "".join(f"def {module}_other_{j}(x):\n    return x - {j}\n\n\n" for j in range(120))
    (pkg / f"{module}.py").write_text(others + textwrap.dedent(code))
    (repo / f"test_{module}.py").write_text(test)
    return repo


def next_action(messages):
    """The scripted agent's next ``(text, tool, arguments)``, from the conversation so far."""
    goal = next(m["content"] for m in messages if m["role"] == "user")
    spec = json.loads(goal.split("SPEC:", 1)[1].strip().splitlines()[0])
    results = [m["content"] for m in messages if m["role"] == "tool"]
    found = re.search(r"^([^\s:]+):(\d+): ", results[0], re.M) if results else None
    path, line = (found.group(1), int(found.group(2))) if found else ("?", 1)
    steps = [
        ("Looking for the faulty expression.", "search", {"pattern": spec["old"].strip()}),
        (f"Reading {path} around line {line}.", "read_file",
         {"path": path, "start_line": max(1, line - 3), "end_line": line + 3}),
        ("Fixing it.", "replace", {"path": path, "old_text": spec["old"], "new_text": spec["new"]}),
        ("Running the tests.", "run_tests", {}),
        ("Done.", "finish", {"summary": f"fixed {path}:{line}; {results[-1].splitlines()[0] if results else ''}"}),
    ]
    return steps[min(len(results), len(steps) - 1)]


def fixer(messages, tools=None, **options):
    """``model: {backend: callable, callable: "bench_coder:fixer", tools: true}``."""
    text, name, args = next_action(messages)
    for word in text.split(" "):
        yield word + " "
    yield {"name": name, "arguments": json.dumps(args)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    scratch = isolate("bench-coder")
    import ray

    from threadbound.agents import sandbox
    from threadbound.agents.builtin import DEFAULT_TEST_COMMAND, DEFAULT_TEST_ENV, _files_block
    from threadbound.agents.workspace import Workspace
    from threadbound.runtime import AgentPool, RuntimeConfig, Task, TaskFailed

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    pool = AgentPool(RuntimeConfig.from_mapping({
        "name": "benchcoder", "max_agents": 2, "max_agents_per_task": 2, "step_timeout_s": 180,
        "task_timeout_s": 600, "snapshot_dir": os.path.join(scratch, "snapshots"), "health": {"enabled": False},
        "metrics": {"port": 0}, "retry": {"max_attempts": 1},
        "model": {"backend": "callable", "callable": "bench_coder:fixer", "tools": True}}))
    rows, ok_all = [], True
    try:
        for name, module, code, test, old, new in REPOS:
            repo = make_repo(Path(scratch) / "repos", name, module, code, test)
            ws = Workspace.for_task(f"premise-{name}", str(repo), root=Path(scratch) / "premise")
            chars = sum(len(t) for t in ws.texts().values())
            dropped = f"(pkg/{module}.py omitted: context budget)" in _files_block(ws)
            with ws.trial() as trial:  # the planted bug makes the test fail before the coder runs
                before = sandbox.run(list(DEFAULT_TEST_COMMAND), cwd=str(trial), env=DEFAULT_TEST_ENV,
                                     limits=sandbox.SandboxLimits(wall_s=120.0),
                                     settings=sandbox.SandboxSettings().hiding(str(repo)))
            goal = f"make the failing test pass\nSPEC: {json.dumps({'old': old, 'new': new})}"
            started = time.monotonic()
            handle = pool.submit(Task(goal=goal, workspace=repo, agents=["coder", "tester"], max_rounds=1))
            try:
                result = handle.result(timeout=600)
                status, outputs = result.status, result.outputs
            except TaskFailed as exc:
                status, outputs = "failed", getattr(exc, "outputs", None) or {}
            coder, tester = outputs.get("coder") or {}, outputs.get("tester") or {}
            rows.append({"repo": name, "chars": chars, "bug": f"pkg/{module}.py", "wholefile_sees_bug": not dropped,
                         "fails_before": before.exit_code != 0,
                         "tool_calls": coder.get("tool_calls"), "tokens": coder.get("tokens"),
                         "wall_s": coder.get("wall_s"), "sandbox_runs": coder.get("sandbox_runs"),
                         "tests_pass": tester.get("ok"), "status": status,
                         "task_s": round(time.monotonic() - started, 2)})
            ok_all &= status == "succeeded"
    finally:
        pool.shutdown()
        ray.shutdown()
    head = ("repo", "chars", "bug in", "whole-file coder sees it", "test fails before", "tool calls", "tokens",
            "coder wall s", "sandbox runs", "tests pass after", "task", "task wall s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        yes = {True: "yes", False: "no", None: "-"}
        print(f"| {r['repo']} | {r['chars']:,} | {r['bug']} | {yes[r['wholefile_sees_bug']]} | "
              f"{yes[r['fails_before']]} | {r['tool_calls']} | {r['tokens']} | {r['wall_s']} | {r['sandbox_runs']} | "
              f"{yes[bool(r['tests_pass'])]} | {r['status']} | {r['task_s']} |")
    print(json.dumps(rows), file=sys.stderr)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
