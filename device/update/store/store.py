"""The board's A/B model store: two slots, one atomic switch, a trial, a version floor and failed versions.

A plain on-disk state machine; the installer drives it (verification, decryption and the health gate live
elsewhere). Layout under ``<state_dir>/update/``::

    slots/a/, slots/b/   complete models only (model.json + files, and the store's own .slot.json record)
    staging/slot-<x>/    the slot being filled; staging/downloads/ is the installer's (kept across restarts)
    store.json           which slot serves, trial or committed, and the fallback slot
    floors.json          per model name, the highest committed version: anything lower is refused; and the
                         plaintext sha256 of each variant installed: old bytes under a new number are refused
    failed.json          per model name, the versions that failed (never retried) and why
    lock                 fcntl.flock: one writer (the agent or the CLI), never waiting: update_busy names the holder

Workflow: :meth:`ModelStore.begin` checks the floor, the failed list and the free space, and returns a
:class:`Staging` (holding the lock) whose directory the installer fills. :meth:`ModelStore.activate` checks
the model loads, fsyncs every file and directory of it, moves it into the inactive slot, then replaces
``store.json`` in one ``os.replace``: that rename is the switch. The new model serves on **trial**, the old
slot kept as its fallback. :meth:`~ModelStore.commit` ends the trial and raises the floor (floor first, so
a crash between the two can only leave a floor too high for a model still on trial, never too low).
:meth:`~ModelStore.rollback` marks the version failed (first), then switches back to the fallback slot, or to
the bundled model when there is none. Nothing installed ever: :meth:`~ModelStore.active` is None and the
caller serves the bundled model (``device/models/vibration``).

What survives what: every state change is write, fsync, ``os.replace``, directory fsync
(:func:`device.statefile.write_atomic`), and a slot is fsynced whole before the rename that names it, so
after a process crash or a power cut (on storage that honours fsync) ``store.json`` names either the old
model or the new one, complete. The tests prove it for process death: an installer SIGKILLed at every step
boundary and at hundreds of random points. Power loss is covered by the fsync ordering, not by a test.

:meth:`~ModelStore.recover` runs at the agent's start (``restarted=True``) and brings back exactly one
consistent state, never none: an install cut short before the switch is discarded (the old model serves);
after the switch the new model **resumes its trial** (the health gate starts watching again), unless the trial
has already been interrupted by ``max_trial_restarts`` restarts (a model that takes the board down with it
must not loop), or its slot is damaged, or its version is already marked failed (a rollback cut short): then
it rolls back and, for the restarts, is marked failed. A
damaged committed slot falls back to the fallback slot or the bundled model (not marked failed: damage is not
the model's fault, and reinstalling the committed version is allowed: the floor refuses only lower ones). A
``store.json`` that cannot be parsed is set aside (``store.json.corrupt-<UTC>``) and rebuilt from the slots'
own records: the committed one (version at or below the floor) serves, or else the newest on trial. Stray
staging, unreferenced slots and temporary files are removed. A corrupt ``floors.json`` is set aside and
rebuilt from the installed versions; a corrupt ``failed.json`` is set aside and starts empty. Each of these is
reported through ``on_event(kind, data)``. A slot is deleted only where nothing serves from it: by
``recover`` and when the next install replaces the fallback.

A rollback after a commit goes back below the floor: it is the board's own decision (a signed command or
the CLI), and the floor still refuses any install of an older version from the repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Callable

from device.clock import SYSTEM_CLOCK
from device.statefile import fsync_dir, move_aside, short_error, write_atomic
from device.update.store import files as sf
from device.update.errors import Busy, RollbackError, StoreError, ValidationFailed
from device.update.store.files import COMMITTED, TRIAL, Recovery, SlotRef, StateCorrupt, StoreState
from device.update.store.recover import recover as _recover
from device.update.store.staging import DOWNLOADS, Staging, clean_staging, ensure_space, os_error

DEFAULT_RESERVE = 8 * 1024 * 1024  # free space an install leaves for the spool and the logs


@dataclass(frozen=True)
class SlotInfo:
    """A slot that serves (or would serve after a rollback): its letter, model, release version and directory.

    ``state`` is ``trial``, ``committed`` or (for the fallback) ``fallback``; ``since`` is the switch time.
    """

    slot: str
    name: str
    version: int
    dir: str
    state: str
    since: float = 0.0
    restarts: int = 0

    def as_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "dir"}


class ModelStore:
    """The A/B store under ``root`` (``<state_dir>/update``). See the module docstring for the workflow.

    Args:
        root: the store's directory (created when missing).
        who: names this process in the lock file (``agent``, ``fieldnode update install``).
        clock: wall-clock stamps (switch times, failed entries, corrupt-file names).
        on_event: ``on_event(kind, data)`` for what the link reports (``activated``, ``committed``,
            ``rolled_back``, ``trial_resumed``, ``slot_damaged``, ``fallback_dropped``, ``state_corrupt``,
            ``store_rebuilt``, ``store_cleaned``).
        reserve_bytes: free space :meth:`begin` leaves on the filesystem beyond the install's own.
        max_trial_restarts: restarts a trial survives; one more rolls it back.
        on_step: called with the name of each step boundary of a state change (the crash tests' seam).
    """

    def __init__(self, root: str, *, who: str = "fieldnode", clock=SYSTEM_CLOCK,
                 on_event: Callable[[str, dict], None] | None = None, reserve_bytes: int = DEFAULT_RESERVE,
                 max_trial_restarts: int = 3, on_step: Callable[[str], None] | None = None):
        self.root = os.path.abspath(root)
        self.slots_dir = os.path.join(self.root, "slots")
        self.staging_dir = os.path.join(self.root, "staging")
        self._store_path = os.path.join(self.root, "store.json")
        self._floors_path = os.path.join(self.root, "floors.json")
        self._failed_path = os.path.join(self.root, "failed.json")
        self._lock = sf.StoreLock(os.path.join(self.root, "lock"), who)
        self._clock, self._on_event, self._on_step = clock, on_event, on_step
        self.reserve_bytes, self.max_trial_restarts = reserve_bytes, max_trial_restarts
        self._staging: Staging | None = None

    @classmethod
    def for_state_dir(cls, state_dir: str, **kwargs) -> ModelStore:
        """The store of the agent's state directory: ``<state_dir>/update``."""
        return cls(os.path.join(state_dir, "update"), **kwargs)

    @property
    def downloads_dir(self) -> str:
        """Where the installer keeps its resumable downloads (``recover`` leaves it alone); created here."""
        path = os.path.join(self.staging_dir, DOWNLOADS)
        os.makedirs(path, exist_ok=True)
        return path

    # --- reading (no lock: store.json is replaced whole, so a read sees one state or the next) ------------

    def active(self) -> SlotInfo | None:
        """The slot that serves, or None when the bundled model does.

        Raises:
            StoreError: ``store.json`` cannot be read or parsed (:meth:`recover` sets it aside).
        """
        s = self._read(self._store_path, sf.parse_store, StoreState())
        return self._info(s.active, s.state, s) if s.active else None

    def fallback(self) -> SlotInfo | None:
        """The slot a rollback would go back to; None means the bundled model."""
        s = self._read(self._store_path, sf.parse_store, StoreState())
        return self._info(s.previous, "fallback", s) if s.previous else None

    def inactive_slot(self) -> str:
        """The letter of the slot the next install fills."""
        return _other(self._read(self._store_path, sf.parse_store, StoreState()))

    def floor(self, name: str) -> int | None:
        """The highest committed version of ``name`` (lower ones are refused), None if never committed."""
        return self._read(self._floors_path, sf.parse_floors, {}).get(name)

    def installed_plaintexts(self, name: str) -> dict:
        """``{(variant, plaintext sha256): version}`` of every version of ``name`` installed on this board: a newer
        version whose variant decrypts to the bytes of an older one is refused (:meth:`begin`)."""
        return self._read(self._floors_path, sf.parse_installed, {}).get(name, {})

    def failed_versions(self, name: str) -> dict:
        """``{version: {"reason", "at"}}``: the versions of ``name`` that failed and are never retried."""
        return self._read(self._failed_path, sf.parse_failed, {}).get(name, {})

    def status(self) -> dict:
        """The store as data, for ``fieldnode update status`` and the birth and status payloads.

        A state file that cannot be read is listed under ``problems`` rather than raised.
        """
        out: dict = {"active": None, "serving": "bundled", "fallback": None, "floors": {}, "failed": {},
                     "installing": None, "problems": []}
        try:
            s = self._read(self._store_path, sf.parse_store, StoreState())
            if s.active:
                out["active"], out["serving"] = self._info(s.active, s.state, s).as_json(), "store"
            out["fallback"] = self._info(s.previous, "fallback", s).as_json() if s.previous else None
        except StoreError as exc:
            out["problems"].append(str(exc))
        try:
            out["floors"] = self._read(self._floors_path, sf.parse_floors, {})
        except StoreError as exc:
            out["problems"].append(str(exc))
        try:
            failed = self._read(self._failed_path, sf.parse_failed, {})
            out["failed"] = {n: [dict(e, version=v) for v, e in sorted(vs.items())] for n, vs in failed.items()}
        except StoreError as exc:
            out["problems"].append(str(exc))
        st = self._staging
        if st is not None and not st.closed:
            out["installing"] = {"slot": st.slot, "name": st.name, "version": st.version}
        return out

    # --- installing -----------------------------------------------------------------------------------

    def begin(self, name: str, version: int, size_hint: int = 0, plaintexts: dict | None = None) -> Staging:
        """Starts an install: checks, takes the lock, and returns an empty staging directory to fill.

        Args:
            name: the model's name (the release's signed facts; ``model.json`` must agree).
            version: the release's integer version.
            size_hint: bytes the install will still write under the store (the download and the model).
            plaintexts: ``{variant: signed plaintext sha256}`` of the release, recorded at :meth:`activate`.

        Raises:
            RollbackError: ``version`` is below the floor, or failed before on this board, or a variant's plaintext
                is the one an older version of the model installed here had (the version floor compares numbers:
                old bytes listed under a new number would pass it).
            NoSpace: the filesystem cannot take ``size_hint`` and keep ``reserve_bytes`` free.
            Busy: another install holds the lock, or a trial is in progress.
            ValidationFailed: ``name`` or ``version`` is not well formed.
            StoreError: a state file cannot be read or parsed.
        """
        if not isinstance(name, str) or not sf.NAME_RE.match(name):
            raise ValidationFailed(f"model name {name!r}: must match {sf.NAME_RE.pattern}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValidationFailed(f"model version {version!r}: expected an integer >= 0")
        self._lock.acquire(f"install {name} v{version}")
        try:
            s = self._read(self._store_path, sf.parse_store, StoreState())
            if s.trial:
                raise Busy(f"{s.active.name} v{s.active.version} is on trial: wait for the agent's verdict, or end "
                           f"it with `fieldnode update commit` or `fieldnode update rollback`")
            floor = self._read(self._floors_path, sf.parse_floors, {}).get(name)
            if floor is not None and version < floor:
                raise RollbackError(f"{name} v{version} is below this board's floor v{floor} (its highest "
                                    f"committed version): a rollback is refused")
            failed = self._read(self._failed_path, sf.parse_failed, {}).get(name, {})
            if version in failed:
                raise RollbackError(f"{name} v{version} failed on this board before and is never retried "
                                    f"({failed[version]['reason']}); publish a new version")
            seen = self._read(self._floors_path, sf.parse_installed, {}).get(name, {})
            for variant, sha in sorted((plaintexts or {}).items()):
                older = seen.get((variant, sha))
                if older is not None and older < version:
                    raise RollbackError(same_bytes(name, version, variant, older, sha))
            slot = _other(s)
            clean_staging(self.staging_dir)
            ensure_space(self, s, slot, size_hint)
            directory = os.path.join(self.staging_dir, f"slot-{slot}")
            os.makedirs(directory)
            self._step("begin.staged")
        except OSError as exc:
            self._lock.release()
            raise os_error(exc, "cannot prepare the staging area", space=True) from exc
        except BaseException:
            self._lock.release()
            raise
        self._staging = Staging(self, slot, name, version, directory)
        self._staging.plaintexts = dict(plaintexts or {})
        return self._staging

    def activate(self, staging: Staging, trial: bool = True) -> SlotInfo:
        """The atomic switch: the staged model becomes the active slot (on trial, or committed at once).

        The staging is closed whatever happens; on an error the active model is the one before.

        Raises:
            ValidationFailed: the staged files are not a loadable model named as the release.
            NoSpace: the disk filled up (the slot's record or a state file could not be written).
            StoreError: this staging is closed, or another I/O error.
        """
        if staging.store is not self or staging.closed:
            raise StoreError("this staging is closed: begin a new install")
        trash = os.path.join(self.staging_dir, f"trash-{staging.slot}")
        try:
            try:
                files = sf.scan_tree(staging.dir)
                sf.check_model(staging.dir, staging.name, files)
            except StateCorrupt as exc:
                raise ValidationFailed(f"{staging.name} v{staging.version}: {exc}") from exc
            sf.fsync_tree(staging.dir)
            sf.write_meta(staging.dir, staging.name, staging.version, files)
            self._step("activate.synced")
            s = self._read(self._store_path, sf.parse_store, StoreState())
            if s.previous is not None and s.previous.slot == staging.slot:  # the fallback is about to go
                s = self._write_store(dataclasses.replace(s, previous=None))
                self._step("activate.unpinned")
            target = os.path.join(self.slots_dir, staging.slot)
            if os.path.lexists(target):
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(target, trash)
                fsync_dir(self.slots_dir)
                self._step("activate.trashed")
            os.makedirs(self.slots_dir, exist_ok=True)
            os.replace(staging.dir, target)
            fsync_dir(self.slots_dir)
            fsync_dir(self.staging_dir)
            self._step("activate.placed")
            ref = SlotRef(staging.slot, staging.name, staging.version)
            if staging.plaintexts:
                self._record_installed(ref, staging.plaintexts)
            if not trial:
                self._raise_floor(ref)
            s = self._write_store(StoreState(ref, TRIAL if trial else COMMITTED, self._clock.time(), 0,
                                             s.active, s.seq))
            self._step("activate.switched")
            shutil.rmtree(trash, ignore_errors=True)
            self._step("activate.done")
        except OSError as exc:
            raise os_error(exc, f"cannot activate {staging.name} v{staging.version}", space=True) from exc
        finally:
            staging.abort()  # a no-op on the placed slot's files: they are no longer in staging
        info = self._info(s.active, s.state, s)
        self._event("activated", info.as_json())
        return info

    def commit(self, version: int | None = None) -> SlotInfo:
        """Ends the trial: the model stays, and the floor of its name rises to its version.

        Args:
            version: when given, the version the caller judged; another one on trial is refused.

        Raises:
            StoreError: no model is on trial (or not that version), or the state cannot be written.
            Busy: the lock is held.
        """
        with self.locked("commit"):
            s = self._read(self._store_path, sf.parse_store, StoreState())
            if not s.trial or (version is not None and s.active.version != version):
                what = f"{s.active.name} v{s.active.version} is {s.state}" if s.active else "nothing is installed"
                raise StoreError(f"no trial to commit{f' for v{version}' if version is not None else ''}: {what}")
            self._raise_floor(s.active)
            self._step("commit.floor")
            s = self._write_store(dataclasses.replace(s, state=COMMITTED, restarts=0))
            self._step("commit.switched")
        info = self._info(s.active, s.state, s)
        self._event("committed", info.as_json())
        return info

    def rollback(self, reason: str, version: int | None = None) -> SlotInfo | None:
        """Goes back to the fallback slot (the bundled model when there is none or it is damaged) and marks
        the version that served as failed, with ``reason``, so it is never installed again.

        Returns:
            The slot that serves now, or None for the bundled model.

        Raises:
            StoreError: nothing is installed (or not that version), or the state cannot be written.
            Busy: the lock is held.
        """
        with self.locked("rollback"):
            s = self._read(self._store_path, sf.parse_store, StoreState())
            if s.active is None or (version is not None and s.active.version != version):
                raise StoreError(f"nothing to roll back{f' for v{version}' if version is not None else ''}: "
                                 + (f"{s.active.name} v{s.active.version} serves" if s.active
                                    else "the bundled model serves"))
            s = self._roll_back(s, reason, mark=True)
        return self._info(s.active, s.state, s) if s.active else None

    # --- recovery -------------------------------------------------------------------------------------

    def recover(self, restarted: bool = True) -> Recovery:
        """Brings the store back to one consistent state and cleans what a cut-short operation left.

        Args:
            restarted: the agent has just started: a trial in progress counts one more restart. An installer
                that only wants the repair and the cleaning passes False.

        Returns:
            What it found and did (see :class:`Recovery`). A resumed or rolled-back trial is reported over a
            repair, because the caller must act on it; the events say what was repaired.

        Raises:
            Busy: another process holds the lock (the state is left as it is).
            StoreError: a state file cannot be read or written (an I/O fault, not corruption).
        """
        with self.locked("recover"):
            try:
                return _recover(self, restarted)
            except OSError as exc:
                raise StoreError(f"cannot recover the store under {self.root}: {exc.strerror or exc}") from exc

    # --- internals ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, what: str):
        """Holds the store lock for ``what`` (a ``with`` block): commit, rollback and recover take it so.

        Raises:
            Busy: another process, or another operation of this one, holds it.
        """
        self._lock.acquire(what)
        try:
            yield self
        finally:
            self._lock.release()

    def _info(self, ref: SlotRef, state: str, s: StoreState) -> SlotInfo:
        live = ref == s.active
        return SlotInfo(ref.slot, ref.name, ref.version, os.path.join(self.slots_dir, ref.slot), state,
                        s.since if live else 0.0, s.restarts if live else 0)

    def _read(self, path: str, parse, default):
        try:
            return sf.read_state(path, parse, default)
        except StateCorrupt as exc:
            raise StoreError(f"{path}: {exc}; the agent sets it aside at its next start") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def _write(self, path: str, data: bytes) -> None:
        try:
            write_atomic(path, data, mode=0o644)
        except OSError as exc:
            raise os_error(exc, f"cannot write {path}") from exc

    def _write_store(self, s: StoreState) -> StoreState:
        s = dataclasses.replace(s, seq=s.seq + 1)
        self._write(self._store_path, sf.dump_store(s))
        return s

    def _raise_floor(self, ref: SlotRef) -> None:
        floors = self._read(self._floors_path, sf.parse_floors, {})
        if floors.get(ref.name, -1) < ref.version:
            floors[ref.name] = ref.version
            installed = self._read(self._floors_path, sf.parse_installed, {})
            self._write(self._floors_path, sf.dump_floors(floors, installed))

    def _record_installed(self, ref: SlotRef, plaintexts: dict) -> None:
        floors = self._read(self._floors_path, sf.parse_floors, {})
        installed = self._read(self._floors_path, sf.parse_installed, {})
        entries = installed.setdefault(ref.name, {})
        for variant, sha in plaintexts.items():
            entries[(variant, sha)] = max(entries.get((variant, sha), -1), ref.version)
        self._write(self._floors_path, sf.dump_floors(floors, installed))

    def _mark_failed(self, ref: SlotRef, reason: str) -> None:
        failed = self._read(self._failed_path, sf.parse_failed, {})
        failed.setdefault(ref.name, {})[ref.version] = {"reason": reason[:sf.MAX_REASON], "at": self._clock.time()}
        self._write(self._failed_path, sf.dump_failed(failed))

    def _roll_back(self, s: StoreState, reason: str, mark: bool) -> StoreState:
        """Switches from ``s.active`` to its fallback (or the bundled model); the lock is held."""
        gone = s.active
        if mark:
            self._mark_failed(gone, reason)
            self._step("rollback.marked")
        back = s.previous
        if back is not None:
            why = sf.check_slot(os.path.join(self.slots_dir, back.slot), back)
            if why:
                self._event("slot_damaged", dict(back.as_json(), reason=why))
                back = None
        s = self._write_store(StoreState(back, COMMITTED, self._clock.time(), 0, None, s.seq))
        self._step("rollback.switched")
        self._event("rolled_back", {"name": gone.name, "version": gone.version, "reason": reason,
                                    "to": back.as_json() if back else "bundled"})
        return s

    def _set_aside(self, path: str, exc: Exception) -> None:
        try:
            moved = move_aside(path, self._clock.time())
        except OSError as err:
            raise StoreError(f"{path} is corrupt ({exc}) and cannot be moved aside: {short_error(err)}") from err
        self._event("state_corrupt", {"file": os.path.basename(path), "error": str(exc), "moved_to": moved})

    def _step(self, name: str) -> None:
        if self._on_step is not None:
            self._on_step(name)

    def _event(self, kind: str, data: dict) -> None:
        if self._on_event is not None:
            self._on_event(kind, data)


def same_bytes(name: str, version: int, variant: str, older: int, sha256: str) -> str:
    """Why a release that decrypts to an older version's bytes is refused (the store's and the planner's words)."""
    return (f"{name} v{version} ({variant}) decrypts to the same model as v{older} installed on this board before "
            f"(plaintext sha256 {sha256[:16]}...): an older model under a newer version number is refused; publish a "
            f"new build")


def _other(s: StoreState) -> str:
    return "b" if s.active is not None and s.active.slot == "a" else "a"
