"""The A/B model store's files: its lock, its JSON state files and each slot's own record.

:mod:`device.update.store.store` holds the workflow; this module only reads, checks and writes. Every parser is
strict: a file that does not match its format raises :class:`StateCorrupt` (the store sets it aside), and an
unreadable one raises ``OSError`` (an environmental fault: the file stays put).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import threading
from dataclasses import dataclass
from enum import Enum

from device.runtime.errors import ModelInvalid
from device.runtime.manifest import MANIFEST_NAME, load_manifest
from device.statefile import fsync_dir, write_atomic
from device.update.errors import Busy, StoreError

FORMAT = 1
SLOTS = ("a", "b")
SLOT_META = ".slot.json"  # the slot's own record, inside the slot, so it moves with the slot's files
MAX_STATE_BYTES = 1024 * 1024
MAX_FAILED_PER_MODEL = 256  # beyond it the lowest versions go: the floor refuses those anyway
MAX_REASON = 300
MAX_INSTALLED_PER_MODEL = 256  # plaintext hashes kept per model name
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the manifest's rule for a model name
TRIAL, COMMITTED = "trial", "committed"


class Recovery(str, Enum):
    """What :meth:`ModelStore.recover <device.update.store.store.ModelStore.recover>` found and did."""

    BUNDLED = "bundled"  # nothing installed: the bundled model serves
    COMMITTED = "committed"  # a committed model serves, as it did
    TRIAL_RESUMED = "trial_resumed"  # a trial was interrupted and goes on: watch the new model again
    ROLLED_BACK = "rolled_back"  # a trial was rolled back (too many restarts, or its slot was damaged)
    REPAIRED = "repaired"  # a corrupt state file or a damaged committed slot, brought back to a safe state


class StateCorrupt(Exception):
    """A state file that does not follow its format (internal: the store turns it into a set-aside)."""


@dataclass(frozen=True)
class SlotRef:
    """Which model a slot holds: the slot's letter, the model's name and its (integer) release version."""

    slot: str
    name: str
    version: int

    def as_json(self) -> dict:
        return {"slot": self.slot, "name": self.name, "version": self.version}


@dataclass(frozen=True)
class StoreState:
    """``store.json``: the active slot and its state, and the fallback slot kept for a rollback.

    Attributes:
        active: the slot that serves; None when the bundled model serves.
        state: ``trial`` or ``committed`` (``committed`` when nothing is installed).
        since: wall-clock seconds of the last switch.
        restarts: how many restarts a trial has gone through (the boot count of U-Boot and RAUC).
        previous: the slot a rollback goes back to; None means the bundled model.
        seq: increases with every write, so two reads can tell whether anything changed.
    """

    active: SlotRef | None = None
    state: str = COMMITTED
    since: float = 0.0
    restarts: int = 0
    previous: SlotRef | None = None
    seq: int = 0

    @property
    def trial(self) -> bool:
        return self.active is not None and self.state == TRIAL


def _int(v, what: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise StateCorrupt(f"{what}: expected an integer >= {low}, got {v!r}")
    return v


def _ref(d, what: str) -> SlotRef:
    if not isinstance(d, dict):
        raise StateCorrupt(f"{what}: expected an object, got {type(d).__name__}")
    slot, name = d.get("slot"), d.get("name")
    if slot not in SLOTS:
        raise StateCorrupt(f"{what}.slot: expected one of {', '.join(SLOTS)}, got {slot!r}")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise StateCorrupt(f"{what}.name: not a model name: {name!r}")
    return SlotRef(slot, name, _int(d.get("version"), f"{what}.version"))


def _load(raw: bytes, source: str) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateCorrupt(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StateCorrupt(f"{source}: expected an object with \"format\": {FORMAT}")
    return data


def parse_store(raw: bytes) -> StoreState:
    """Parses ``store.json``.

    Raises:
        StateCorrupt: what is wrong, by field.
    """
    d = _load(raw, "store.json")
    active = None if d.get("active") is None else _ref(d["active"], "active")
    previous = None if d.get("previous") is None else _ref(d["previous"], "previous")
    state, since = COMMITTED, 0.0
    restarts = 0
    if active is not None:
        state = d["active"].get("state")
        if state not in (TRIAL, COMMITTED):
            raise StateCorrupt(f"active.state: expected trial or committed, got {state!r}")
        since = d["active"].get("since")
        if isinstance(since, bool) or not isinstance(since, (int, float)):
            raise StateCorrupt(f"active.since: expected a number, got {since!r}")
        restarts = _int(d["active"].get("restarts", 0), "active.restarts")
    elif previous is not None:
        raise StateCorrupt("previous: a fallback without an active slot")
    if active is not None and previous is not None and active.slot == previous.slot:
        raise StateCorrupt("previous.slot: the same slot as the active one")
    return StoreState(active, state, float(since), restarts, previous, _int(d.get("seq", 0), "seq"))


def dump_store(s: StoreState) -> bytes:
    active = None
    if s.active is not None:
        active = dict(s.active.as_json(), state=s.state, since=s.since, restarts=s.restarts)
    previous = None if s.previous is None else s.previous.as_json()
    return _dump({"format": FORMAT, "seq": s.seq, "active": active, "previous": previous})


def parse_floors(raw: bytes) -> dict:
    """Parses ``floors.json``: ``{"format": 1, "floors": {name: version}}`` → ``{name: version}``."""
    floors = _load(raw, "floors.json").get("floors")
    if not isinstance(floors, dict):
        raise StateCorrupt("floors.json: floors: expected an object of model name -> version")
    for name, v in floors.items():
        if not NAME_RE.match(name):
            raise StateCorrupt(f"floors.json: not a model name: {name!r}")
        _int(v, f"floors.json: floors.{name}")
    return dict(floors)


def parse_installed(raw: bytes) -> dict:
    """Parses ``floors.json``'s ``installed``: the signed plaintext sha256 of each variant of each version installed
    on this board → ``{name: {(variant, sha256): version}}`` (a file written before it was kept: empty)."""
    d = _load(raw, "floors.json").get("installed", {})
    if not isinstance(d, dict):
        raise StateCorrupt("floors.json: installed: expected an object of model name -> list")
    out: dict = {}
    for name, entries in d.items():
        if not NAME_RE.match(name) or not isinstance(entries, list):
            raise StateCorrupt(f"floors.json: installed.{name}: expected a model name and a list")
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("variant"), str) \
                    or not isinstance(e.get("sha256"), str) or not SHA256_RE.match(e["sha256"]):
                raise StateCorrupt(f"floors.json: installed.{name}: expected {{version, variant, sha256}} entries")
            out.setdefault(name, {})[(e["variant"], e["sha256"])] = _int(e.get("version"),
                                                                           f"floors.json: installed.{name}.version")
    return out


def dump_floors(floors: dict, installed: dict | None = None) -> bytes:
    """``floors.json``: the floors, and the plaintexts installed (the newest :data:`MAX_INSTALLED_PER_MODEL` per
    model: older ones are below the floor anyway)."""
    body: dict = {"format": FORMAT, "floors": dict(sorted(floors.items()))}
    if installed:
        body["installed"] = {}
        for name, entries in sorted(installed.items()):
            rows = [{"version": v, "variant": var, "sha256": sha}
                    for (var, sha), v in sorted(entries.items(), key=lambda kv: (kv[1], kv[0]))]
            body["installed"][name] = rows[-MAX_INSTALLED_PER_MODEL:]
    return _dump(body)


def parse_failed(raw: bytes) -> dict:
    """Parses ``failed.json`` → ``{name: {version: {"reason": str, "at": float}}}``."""
    failed = _load(raw, "failed.json").get("failed")
    if not isinstance(failed, dict):
        raise StateCorrupt("failed.json: failed: expected an object of model name -> list")
    out = {}
    for name, entries in failed.items():
        if not NAME_RE.match(name) or not isinstance(entries, list):
            raise StateCorrupt(f"failed.json: failed.{name}: expected a model name and a list")
        out[name] = {}
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("reason"), str) \
                    or isinstance(e.get("at"), bool) or not isinstance(e.get("at"), (int, float)):
                raise StateCorrupt(f"failed.json: failed.{name}: expected {{version, reason, at}} entries")
            out[name][_int(e.get("version"), f"failed.json: failed.{name}.version")] = \
                {"reason": e["reason"], "at": float(e["at"])}
    return out


def dump_failed(failed: dict) -> bytes:
    body = {}
    for name, versions in sorted(failed.items()):
        keep = sorted(versions)[-MAX_FAILED_PER_MODEL:]
        body[name] = [{"version": v, "reason": versions[v]["reason"], "at": versions[v]["at"]} for v in keep]
    return _dump({"format": FORMAT, "failed": body})


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def read_state(path: str, parse, default):
    """Reads and parses one state file; ``default`` when it does not exist.

    Raises:
        StateCorrupt: the content is malformed (or too large to be ours).
        OSError: the file exists but cannot be read.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return default
    if len(raw) > MAX_STATE_BYTES:
        raise StateCorrupt(f"{os.path.basename(path)}: larger than {MAX_STATE_BYTES} bytes")
    return parse(raw)


# --- a slot's files -----------------------------------------------------------------------------------------

def scan_tree(root: str) -> dict:
    """The regular files under ``root`` (relative path → size), without the slot's own record.

    Raises:
        StateCorrupt: a symlink, a device or another special file: a model is plain files only.
    """
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise StateCorrupt(f"{rel}: not a regular file (a model holds plain files only)")
            if rel != SLOT_META:
                files[rel] = st.st_size
    return files


def fsync_tree(root: str) -> None:
    """Fsyncs every file, then every directory bottom-up, so the whole slot is on disk before it is named."""
    for dirpath, _dirs, filenames in os.walk(root, topdown=False):
        for n in filenames:
            fd = os.open(os.path.join(dirpath, n), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def write_meta(slot_dir: str, name: str, version: int, files: dict) -> None:
    body = {"format": FORMAT, "name": name, "version": version, "files": dict(sorted(files.items()))}
    write_atomic(os.path.join(slot_dir, SLOT_META), _dump(body), mode=0o644)


def read_meta(slot_dir: str) -> tuple:
    """Reads a slot's record → ``(name, version, files)`` (files: relative path → size).

    Raises:
        StateCorrupt: missing or malformed.
    """
    try:
        d = read_state(os.path.join(slot_dir, SLOT_META), lambda raw: _load(raw, SLOT_META), None)
    except OSError as exc:
        raise StateCorrupt(f"{SLOT_META}: cannot read: {exc.strerror or exc}") from exc
    if d is None:
        raise StateCorrupt(f"{SLOT_META} is missing")
    name, files = d.get("name"), d.get("files")
    if not isinstance(name, str) or not NAME_RE.match(name) or not isinstance(files, dict):
        raise StateCorrupt(f"{SLOT_META}: expected name, version and files")
    for rel, size in files.items():
        _int(size, f"{SLOT_META}: files.{rel}")
    return name, _int(d.get("version"), f"{SLOT_META}: version"), files


def check_model(slot_dir: str, name: str, files: dict) -> None:
    """Checks that a staged tree is a loadable model called ``name`` whose every named file is there.

    Raises:
        StateCorrupt: what is wrong (the store reports it as a validation failure).
    """
    if MANIFEST_NAME not in files:
        raise StateCorrupt(f"no {MANIFEST_NAME}")
    try:
        m = load_manifest(slot_dir)
    except ModelInvalid as exc:
        raise StateCorrupt(str(exc)) from exc
    if m.name != name:
        raise StateCorrupt(f"{MANIFEST_NAME} names the model {m.name!r}, the release says {name!r}")
    named = [v.path for v in m.variants.values()] + ([m.testvectors] if m.testvectors else [])
    for path in named:
        rel = os.path.relpath(path, slot_dir).replace(os.sep, "/")
        if rel not in files:
            raise StateCorrupt(f"{MANIFEST_NAME} names {rel}, which is not in the model")


def check_slot(slot_dir: str, ref: SlotRef) -> str | None:
    """Why the slot cannot serve ``ref`` (a missing or resized file, another model, a bad manifest), or None."""
    if not os.path.isdir(slot_dir):
        return "its directory is missing"
    try:
        name, version, files = read_meta(slot_dir)
        if (name, version) != (ref.name, ref.version):
            return f"it holds {name} v{version}, not {ref.name} v{ref.version}"
        for rel, size in sorted(files.items()):
            try:
                actual = os.stat(os.path.join(slot_dir, rel)).st_size
            except OSError as exc:
                return f"{rel}: {exc.strerror or exc}"
            if actual != size:
                return f"{rel} is {actual} bytes, not {size}"
        check_model(slot_dir, name, files)
    except StateCorrupt as exc:
        return str(exc)
    return None


# --- the lock -----------------------------------------------------------------------------------------------

class StoreLock:
    """One writer at a time across processes (``fcntl.flock``, never waiting) and within this one.

    The holder writes ``<pid> <who>: <what>`` into the file, so a refused caller can say who holds it. The
    lock is released with ``LOCK_UN`` before the close: a process forked while it was held (an inference
    worker) shares the open file and would otherwise keep it.
    """

    def __init__(self, path: str, who: str):
        self.path = path
        self.who = who
        self._mu = threading.Lock()
        self._fd: int | None = None
        self.what: str | None = None

    def acquire(self, what: str) -> None:
        """Takes the lock for ``what`` (``install vibration v8``).

        Raises:
            Busy: another process, or another operation of this one, holds it (the message names it).
            StoreError: the lock file cannot be opened.
        """
        with self._mu:
            if self._fd is not None:
                raise Busy(f"the update store is busy in this process ({self.what}); try again when it is done")
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot open the store lock {self.path}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise Busy(f"the update store is locked by {holder}; try again when it is done") from None
                raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
            with contextlib.suppress(OSError):  # naming the holder is a courtesy, the flock is the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {self.who}: {what}\n".encode()[:200], 0)
            self._fd, self.what = fd, what

    def release(self) -> None:
        with self._mu:
            fd, self._fd, self.what = self._fd, None, None
            if fd is None:
                return
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    pid, _, rest = text.partition(" ")
    if pid.isdigit():
        return f"pid {pid} ({rest})" if rest else f"pid {pid}"
    return "another process"
