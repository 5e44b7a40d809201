"""State files: atomic replacement and setting a corrupt file aside, on real files."""

import os
import pathlib
import stat

import pytest

from device.statefile import AtomicFile, fsync_dir, move_aside, set_aside, short_error, write_atomic


def test_write_atomic_creates_the_directory_and_replaces_whole(tmp_path):
    path = tmp_path / "deep" / "state.json"
    write_atomic(str(path), b"one")
    write_atomic(str(path), b"two")
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["state.json"]  # no temporary file left behind


def test_write_atomic_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    target_dir = tmp_path / "state.json.d"
    target_dir.mkdir()
    (target_dir / "x").write_bytes(b"")
    try:
        write_atomic(str(target_dir), b"new")  # os.replace onto a non-empty directory fails
    except OSError:
        pass
    else:
        raise AssertionError("replacing a non-empty directory should fail")
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.json.d"]


def test_set_aside_keeps_the_file_under_a_corrupt_name(tmp_path):
    path = tmp_path / "q.json"
    path.write_bytes(b"{")
    assert set_aside(str(path), 1700000000.9) == f"moved it to {path}.corrupt-20231114T221320Z"
    assert not path.exists() and (tmp_path / "q.json.corrupt-20231114T221320Z").read_bytes() == b"{"
    path.write_bytes(b"[")  # corrupt again within the same second: a new name, the first one kept
    assert set_aside(str(path), 1700000000.1) == f"moved it to {path}.corrupt-20231114T221320Z.2"
    assert (tmp_path / "q.json.corrupt-20231114T221320Z.2").read_bytes() == b"["
    assert set_aside(str(path), 1.0).startswith("could not move it aside (No such file")


def test_move_aside_takes_every_side_file_along(tmp_path):
    base = str(tmp_path / "spool.db")
    for suffix in ("", "-wal", "-shm"):  # no -journal: a side file that is absent is no error
        (tmp_path / ("spool.db" + suffix)).write_bytes(suffix.encode() or b"main")
    target = move_aside(base, 1767229261.5, ("-wal", "-shm", "-journal"))
    assert target == base + ".corrupt-20260101T010101Z"
    assert sorted(os.listdir(tmp_path)) == sorted("spool.db.corrupt-20260101T010101Z" + s for s in ("", "-wal", "-shm"))
    assert (tmp_path / "spool.db.corrupt-20260101T010101Z-wal").read_bytes() == b"-wal"


def test_fsync_dir_syncs_the_directory_and_is_best_effort_when_it_cannot_open_it(tmp_path, mocker):
    # os.fsync is wrapped, not replaced: the real fsync runs, the test learns which inode it was given.
    synced = []
    real = os.fsync
    mocker.patch("os.fsync", side_effect=lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd))[1])
    fsync_dir(str(tmp_path))
    assert synced == [os.stat(tmp_path).st_ino]
    fsync_dir(str(tmp_path / "missing"))  # cannot open: the rename it guards is done already, no error
    assert synced == [os.stat(tmp_path).st_ino]


def test_short_error_prefers_the_os_text_and_cuts_long_messages():
    assert short_error(FileNotFoundError(2, "No such file or directory", "/x")) == "No such file or directory"
    assert len(short_error(ValueError("x" * 500))) == 120


# --- the one atomic writer (issue 16, part 4) ---------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o077, 0o644), (0o000, 0o600), (0o022, 0o640)])
def test_the_mode_is_the_one_asked_for_whatever_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomic(str(tmp_path / "a"), b"x", mode=mode)
        with AtomicFile(str(tmp_path / "b"), mode) as af:
            af.file.write(b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == mode


def test_an_atomic_file_streams_takes_its_final_name_late_and_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "target.age"
    dest.write_bytes(b"old")
    with pytest.raises(ValueError), AtomicFile(str(dest), 0o644) as af:
        af.file.write(b"half of it")
        raise ValueError("the stream broke")
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["target.age"]
    with AtomicFile(str(dest), 0o644) as af:
        for _ in range(3):
            af.file.write(b"chunk")
        af.path = str(tmp_path / "abc123.target.age")  # named by its hash once it is known
    assert (tmp_path / "abc123.target.age").read_bytes() == b"chunk" * 3
    assert sorted(os.listdir(tmp_path)) == ["abc123.target.age", "target.age"]


def test_the_update_path_the_repository_tool_and_the_installer_have_no_writer_of_their_own():
    """Four writers with different fsync and mode semantics became one: nothing under these packages makes its
    own temporary file (device/statefile.py does, for all of them)."""
    top = pathlib.Path(__file__).resolve().parents[2]
    own = []
    for package in ("device/update", "tools/repo", "tools/install"):
        for path in sorted((top / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if "mkstemp" in text or "NamedTemporaryFile" in text or "import tempfile" in text:
                own.append(str(path.relative_to(top)))
    assert own == []
