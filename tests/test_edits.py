"""Parsing a model's reply into edits, and review verdicts."""

import pytest

from threadbound.agents.builtin import parse_pytest, parse_verdict
from threadbound.agents.edits import PatchError, apply_hunks, parse


def test_fenced_block_with_language_and_path():
    e = parse("Fix:\n```python src/fizz.py\nx = 1\n```\n")
    assert e.files == {"src/fizz.py": "x = 1\n"}


@pytest.mark.parametrize("label", ["src/fizz.py", "`src/fizz.py`", "**src/fizz.py**", "File: src/fizz.py",
                                   "# src/fizz.py", "src/fizz.py:"])
def test_path_alone_on_the_line_before_the_fence(label):
    e = parse(f"Here you go.\n\n{label}\n```python\nx = 2\n```\n")
    assert e.files == {"src/fizz.py": "x = 2\n"}


def test_block_without_a_path_is_not_an_edit():
    assert not parse("Example:\n```python\nprint('hi')\n```\n")


def test_unified_diff_applies_even_with_shifted_line_numbers():
    e = parse("```diff\n--- a/m.py\n+++ b/m.py\n@@ -10,3 +10,3 @@\n a = 1\n-b = 2\n+b = 3\n c = 4\n```")
    (path, hunks), = e.patches
    assert path == "m.py"
    assert apply_hunks("# header\na = 1\nb = 2\nc = 4\n", hunks) == "# header\na = 1\nb = 3\nc = 4\n"


def test_bare_diff_new_and_deleted_files():
    e = parse("--- /dev/null\n+++ b/new.py\n@@ -0,0 +1,2 @@\n+x = 1\n+y = 2\n"
              "--- a/old.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-z = 3\n")
    assert e.files == {"new.py": "x = 1\ny = 2\n"} and e.deletes == ["old.py"]


def test_diff_that_does_not_match_is_a_clear_error():
    (_, hunks), = parse("--- a/m.py\n+++ b/m.py\n@@ -1 +1 @@\n-nothing like it\n+x\n").patches
    with pytest.raises(PatchError, match="does not match"):
        apply_hunks("a = 1\n", hunks)


@pytest.mark.parametrize("text, verdict", [
    ("Looks good.\nVERDICT: APPROVE", "approve"),
    ("verdict - request changes: add tests", "request_changes"),
    ('{"verdict": "approve", "reasons": ["small"]}', "approve"),
    ('```json\n{"verdict": "request_changes", "reasons": "missing case"}\n```', "request_changes"),
    ("I think it is fine?", None),
])
def test_verdicts_are_parsed_robustly(text, verdict):
    assert parse_verdict(text)[0] == verdict


def test_pytest_summary_counts():
    out = "....F\nFAILED test_x.py::t - assert 1 == 2\n1 failed, 4 passed, 1 error in 0.12s\n"
    assert parse_pytest(out) == {"passed": 4, "failed": 1, "errors": 1, "skipped": 0}


@pytest.mark.parametrize("name", [
    "evil\x1b[2K\x1b[1A\x1b[31mname.py",   # an escape sequence: it would rewrite the terminal that shows it
    "a\rb.py", "form\x0cfeed.py", "del\x7f.py", "c1\x9b2J.py",
    "access\u202e\u2066.py",                # bidi controls: the name reads as another one
    "zero\u200bwidth.py", "rtl\u200f.py", "sep\u2028.py",
])
def test_a_file_name_with_control_characters_or_bidi_controls_is_refused_as_dotdot_is(tmp_path, name):
    from threadbound.agents.workspace import Workspace

    # Given: a coder's reply whose diff creates, patches and deletes files with such names
    reply = (f"--- /dev/null\n+++ b/{name}\n@@ -0,0 +1 @@\n+x = 1\n"
             f"--- a/{name}\n+++ b/{name}\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
             f"--- a/{name}\n+++ /dev/null\n@@ -1 +0,0 @@\n-x = 1\n"
             "--- /dev/null\n+++ b/fine.py\n@@ -0,0 +1 @@\n+y = 1\n")
    # When: it is parsed and applied to a copy
    edits = parse(reply)
    (tmp_path / "src").mkdir()
    ws = Workspace.for_task("t-names", str(tmp_path / "src"), root=str(tmp_path / "copies"))
    changed, problems = ws.apply(edits)
    # Then: only the good file is written; each refusal names the file safely and says why
    assert changed == ["fine.py"] and sorted(p.name for p in ws.path.iterdir()) == ["fine.py"]
    assert len(problems) == 3 and all("refused: its name has" in p for p in problems)
    assert all(p.isprintable() for p in problems), problems
    assert name not in edits.files and not edits.patches and not edits.deletes

