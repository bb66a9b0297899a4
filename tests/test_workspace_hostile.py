"""The workspace copy is hostile: agents outside the sandbox read it without following
links, without blocking, within bounds, and never write through it to anything else.

Each test plants what a malicious test run (or model) could leave in the copy, then
checks that the attack failed.
"""

import os
import stat
import tracemalloc

import pytest

from threadbound.agents.edits import Edits
from threadbound.agents.workspace import Workspace, WorkspaceError

SECRET = "TOP-SECRET-d41d8cd98f00b204"


@pytest.fixture
def setup(tmp_path):
    """An original with a module and a package, its task copy, and a secret outside both."""
    original = tmp_path / "original"
    (original / "pkg").mkdir(parents=True)
    (original / "app.py").write_text("x = 1\n")
    (original / "pkg" / "mod.py").write_text("y = 2\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text(SECRET + "\n")
    ws = Workspace.for_task("t-1", str(original), root=tmp_path / "copies")
    return ws, original, outside, secret


def everything_read(ws):
    change = ws.change()
    return "".join([*ws.texts().values(), *change.after.values(), change.diff()])


# --- symbolic links in the copy ---------------------------------------------------------


def test_a_link_to_a_secret_is_not_read_into_texts_change_or_diff(setup):
    ws, _, _, secret = setup
    # Given a test run that planted a link to a secret file
    os.symlink(secret, ws.path / "notes.txt")
    # When the coder and reviewer read the copy
    texts, change = ws.texts(), ws.change()
    # Then the link is left out, said to be, and its target never read
    assert "notes.txt" not in texts and "notes.txt" not in change.paths
    assert "symbolic link" in change.skipped["notes.txt"]
    assert SECRET not in everything_read(ws)


def test_a_tracked_file_replaced_by_a_link_is_neither_read_nor_shown_as_deleted(setup):
    ws, _, _, secret = setup
    (ws.path / "app.py").unlink()
    os.symlink(secret, ws.path / "app.py")
    change = ws.change()
    assert SECRET not in everything_read(ws)
    assert "app.py" not in change.paths and "app.py" in change.skipped


def test_a_hard_link_to_a_file_outside_is_neither_read_nor_written_through(setup):
    ws, _, _, secret = setup
    os.link(secret, ws.path / "hard.txt")  # same filesystem: tmp_path holds both
    assert "hard.txt" not in ws.texts() and SECRET not in everything_read(ws)
    with pytest.raises(WorkspaceError, match="hard links"):
        ws.read("hard.txt")
    ws.write("hard.txt", "pwned\n")
    assert secret.read_text() == SECRET + "\n"


def test_read_and_write_refuse_a_link_as_the_file(setup):
    ws, _, _, secret = setup
    os.symlink(secret, ws.path / "notes.txt")
    with pytest.raises(WorkspaceError, match="symbolic link; refused"):
        ws.read("notes.txt")
    with pytest.raises(WorkspaceError, match="symbolic link; refused"):
        ws.write("notes.txt", "pwned\n")
    with pytest.raises(WorkspaceError, match="symbolic link; refused"):
        ws.resolve("notes.txt")
    changed, problems = ws.apply(Edits(files={"notes.txt": "pwned\n"}, deletes=["notes.txt"]))
    assert changed == [] and len(problems) == 2
    assert secret.read_text() == SECRET + "\n" and os.path.islink(ws.path / "notes.txt")


def test_read_and_write_refuse_a_linked_directory_on_the_way(setup):
    ws, _, outside, secret = setup
    os.symlink(outside, ws.path / "sub")
    with pytest.raises(WorkspaceError, match="symbolic link; refused"):
        ws.read("sub/secret.txt")
    with pytest.raises(WorkspaceError, match="symbolic link; refused"):
        ws.write("sub/planted.py", "pwned\n")
    with pytest.raises(WorkspaceError, match="symbolic link; refused"):
        ws.write("sub/new/deeper.py", "pwned\n")
    with pytest.raises(WorkspaceError, match="symbolic link; refused"):
        ws.resolve("sub/secret.txt")
    _, problems = ws.apply(Edits(deletes=["sub/secret.txt"]))
    assert problems
    assert sorted(os.listdir(outside)) == ["secret.txt"] and secret.read_text() == SECRET + "\n"


def test_paths_that_leave_the_copy_are_refused(setup):
    ws, _, _, secret = setup
    for rel in ("../outside/secret.txt", "/etc/passwd", "pkg/../../outside/secret.txt"):
        with pytest.raises(WorkspaceError, match="leaves the workspace"):
            ws.read(rel)
        with pytest.raises(WorkspaceError, match="leaves the workspace"):
            ws.write(rel, "pwned\n")
    _, problems = ws.apply(Edits(deletes=["../../outside/secret.txt"]))
    assert problems and secret.read_text() == SECRET + "\n"


# --- files that never end, block, or are huge --------------------------------------------


@pytest.mark.timeout(10)
def test_a_link_to_dev_zero_does_not_hang_or_exhaust_memory(setup):
    ws, _, _, _ = setup
    os.symlink("/dev/zero", ws.path / "zero.txt")
    assert "zero.txt" not in ws.texts() and "zero.txt" in ws.change().skipped
    with pytest.raises(WorkspaceError, match="symbolic link"):
        ws.read("zero.txt")


@pytest.mark.timeout(10)
def test_a_fifo_does_not_block_a_read_a_walk_or_apply_back(setup):
    ws, original, _, _ = setup
    os.mkfifo(ws.path / "pipe.py")
    assert "pipe.py" not in ws.texts()
    with pytest.raises(WorkspaceError, match="FIFO"):
        ws.read("pipe.py")
    with pytest.raises(WorkspaceError, match="FIFO"):
        ws.write("pipe.py", "x\n")
    touched, refused = ws.write_back()
    assert touched == [] and any(r.startswith("pipe.py: a FIFO") for r in refused)
    assert not os.path.lexists(original / "pipe.py")


@pytest.mark.timeout(30)
def test_a_50_mb_file_replacing_a_tracked_one_is_not_read_shown_or_copied_back(setup):
    ws, original, _, _ = setup
    with open(ws.path / "app.py", "wb") as f:
        f.truncate(50 * 1024 * 1024)
    tracemalloc.start()
    try:
        change = ws.change()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024
    assert "app.py" not in change.after and "app.py" not in change.paths
    assert "larger than" in change.skipped["app.py"]
    touched, refused = ws.write_back(change)
    assert touched == [] and any(r.startswith("app.py: larger than") for r in refused)
    assert (original / "app.py").read_text() == "x = 1\n"
    with pytest.raises(WorkspaceError, match="larger than"):
        ws.read("app.py")


@pytest.mark.timeout(60)
def test_the_text_of_one_tree_stops_at_its_byte_budget(setup):
    ws, _, _, _ = setup
    block = ("# " + "x" * 97 + "\n") * 1900  # 190,000 bytes: under the per-file limit
    for i in range(120):  # 22.8 MB in all
        (ws.path / f"gen{i:03}.py").write_text(block)
    change = ws.change()
    assert sum(len(t) for t in change.after.values()) <= 20_000_000
    budget = [rel for rel, why in change.skipped.items() if "budget" in why]
    assert budget and not set(budget) & set(change.paths)


# --- trees that never end ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_deep_tree_is_walked_only_to_its_bound(setup):
    ws, _, _, _ = setup
    deep = ws.path.joinpath(*["d"] * 80)  # past the 64 nested directories a walk enters
    deep.mkdir(parents=True)
    (deep / "bottom.py").write_text("z = 3\n")
    assert not any(rel.endswith("bottom.py") for rel in ws.texts())
    assert "nested directories" in ws.scan().truncated
    with pytest.raises(WorkspaceError, match="too large to review"):
        ws.change()


@pytest.mark.timeout(120)
def test_a_wide_tree_is_walked_only_to_its_bound(setup):
    ws, _, _, _ = setup
    wide = ws.path / "wide"
    wide.mkdir()
    for i in range(25_000):  # past the 20,000 entries a walk looks at
        (wide / f"f{i}.py").write_bytes(b"")
    assert len(ws.texts()) < 25_000
    assert "entries" in ws.scan().truncated
    with pytest.raises(WorkspaceError, match="too large to review"):
        ws.change()


# --- apply back into the user's workspace -------------------------------------------------


def test_apply_back_does_not_copy_a_links_target_into_the_original(setup):
    ws, original, _, secret = setup
    os.symlink(secret, ws.path / "notes.txt")
    ws.write("app.py", "x = 2\n")
    touched, refused = ws.write_back()
    assert touched == ["app.py"] and (original / "app.py").read_text() == "x = 2\n"
    assert not os.path.lexists(original / "notes.txt")
    assert [r for r in refused if r.startswith("notes.txt: a symbolic link")]
    assert ws.apply_back() == []  # app.py is now the same on both sides; notes.txt still refused


def test_apply_back_does_not_write_through_a_link_planted_in_the_original(setup):
    ws, original, _, secret = setup
    # Given a reviewed change that adds new.py and edits app.py
    ws.write("new.py", "n = 1\n")
    ws.write("app.py", "x = 2\n")
    change = ws.change()
    # When, before it is applied, both names in the original become links to a file outside
    os.symlink(secret, original / "new.py")
    (original / "app.py").unlink()
    os.symlink(secret, original / "app.py")
    touched, refused = ws.write_back(change)
    # Then nothing is written through them
    assert touched == [] and secret.read_text() == SECRET + "\n"
    assert {r.split(":")[0] for r in refused} == {"new.py", "app.py"}
    assert all("symbolic link" in r for r in refused)


def test_apply_back_does_not_write_or_delete_through_a_linked_directory_in_the_original(setup):
    ws, original, outside, _ = setup
    (outside / "pkg").mkdir()
    (outside / "pkg" / "mod.py").write_text("victim = True\n")
    (outside / "pkg" / "gone.py").write_text("victim = True\n")
    (original / "pkg" / "gone.py").write_text("g = 1\n")
    ws.write("pkg/mod.py", "y = 3\n")
    ws.write("pkg/added.py", "a = 1\n")
    change = ws.change()  # gone.py came after the copy: it is a deletion
    assert set(change.paths) == {"pkg/mod.py", "pkg/added.py", "pkg/gone.py"}
    # the package directory of the original becomes a link to a directory outside
    os.rename(original / "pkg", original / "pkg-real")
    os.symlink(outside / "pkg", original / "pkg")
    touched, refused = ws.write_back(change)
    assert touched == [] and len(refused) == 3
    assert sorted(os.listdir(outside / "pkg")) == ["gone.py", "mod.py"]
    assert (outside / "pkg" / "mod.py").read_text() == "victim = True\n"


def test_apply_back_deletes_only_regular_files(setup):
    ws, original, outside, _ = setup
    # a FIFO and a link in the original that the copy lacks: they look deleted
    os.mkfifo(original / "fifo.py")
    os.symlink(outside / "secret.txt", original / "link.py")
    (ws.path / "pkg" / "mod.py").unlink()
    change = ws.change()
    assert change.paths == ["pkg/mod.py"] and set(change.skipped) == {"fifo.py", "link.py"}
    # the file to delete becomes a link before the change is applied
    (original / "pkg" / "mod.py").unlink()
    os.symlink(outside / "secret.txt", original / "pkg" / "mod.py")
    touched, refused = ws.write_back(change)
    assert touched == [] and len(refused) == 3
    assert os.path.lexists(original / "fifo.py") and os.path.islink(original / "link.py")
    assert os.path.islink(original / "pkg" / "mod.py") and (outside / "secret.txt").exists()


def test_ordinary_edits_round_trip_with_sane_modes(setup):
    ws, original, _, _ = setup
    os.chmod(original / "app.py", 0o755)
    os.chmod(ws.path / "app.py", 0o755)
    changed, problems = ws.apply(Edits(files={"b/app.py": "x = 2\n", "pkg/sub/new.py": "n = 1\n"},
                                       deletes=["pkg/mod.py"]))
    assert problems == [] and ws.read("app.py") == "x = 2\n"
    assert ws.changed() == ["app.py", "pkg/mod.py", "pkg/sub/new.py"]
    assert ws.apply_back() == ["app.py", "pkg/mod.py", "pkg/sub/new.py"]
    assert (original / "pkg" / "sub" / "new.py").read_text() == "n = 1\n"
    assert not (original / "pkg" / "mod.py").exists()
    assert stat.S_IMODE(os.stat(original / "app.py").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(original / "pkg" / "sub" / "new.py").st_mode) == 0o644
    assert ws.changed() == []


# --- private, short-lived copies ----------------------------------------------------------


def test_copies_and_their_root_are_private(setup):
    ws, _, _, _ = setup
    assert stat.S_IMODE(os.stat(ws.path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ws.path).st_mode) == 0o700


def test_a_shared_workspaces_root_is_made_private(tmp_path):
    (tmp_path / "src").mkdir()
    root = tmp_path / "copies"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)
    Workspace.for_task("t", str(tmp_path / "src"), root=root)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700


def test_a_workspaces_root_planted_as_a_link_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "attacker").mkdir()
    os.symlink(tmp_path / "attacker", tmp_path / "copies")
    with pytest.raises(WorkspaceError, match="symbolic link"):
        Workspace.for_task("t", str(tmp_path / "src"), root=tmp_path / "copies")
    assert os.listdir(tmp_path / "attacker") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another user's")
def test_a_workspaces_root_of_another_user_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "copies").mkdir()
    os.chown(tmp_path / "copies", 65534, 65534)
    with pytest.raises(WorkspaceError, match="belongs to uid 65534"):
        Workspace.for_task("t", str(tmp_path / "src"), root=tmp_path / "copies")


def test_the_original_links_are_copied_as_links_and_specials_not_at_all(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "secret.txt").write_text(SECRET)
    os.symlink(tmp_path / "secret.txt", src / "link.txt")
    os.mkfifo(src / "pipe")
    ws = Workspace.for_task("t", str(src), root=tmp_path / "copies")
    assert os.path.islink(ws.path / "link.txt") and not os.path.lexists(ws.path / "pipe")
    assert ws.change().paths == [] and SECRET not in everything_read(ws)


@pytest.mark.timeout(60)
def test_discard_removes_the_copy_and_nothing_a_link_in_it_points_to(setup):
    ws, _, outside, secret = setup
    os.symlink(outside, ws.path / "dirlink")
    os.symlink(secret, ws.path / "filelink")
    os.mkfifo(ws.path / "pipe")
    locked = ws.path / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f.py").write_text("x\n")
    os.chmod(locked / "inner", 0o000)
    os.chmod(locked, 0o500)
    # a tree deeper than Python's recursion limit
    fd = os.open(ws.path, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    assert Workspace.discard("t-1", root=ws.path.parent) is True
    assert not os.path.lexists(ws.path)
    assert sorted(os.listdir(outside)) == ["secret.txt"] and secret.read_text() == SECRET + "\n"
    assert Workspace.discard("t-1", root=ws.path.parent) is False
