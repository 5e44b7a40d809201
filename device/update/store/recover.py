""":meth:`ModelStore.recover <device.update.store.store.ModelStore.recover>`: the start-up repair of the A/B store.

The rules (which state wins, what is set aside, what is cleaned) are in :mod:`device.update.store.store`'s
docstring; this module applies them with the store's lock held.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from device.statefile import fsync_dir
from device.update.store import files as sf
from device.update.errors import StoreError
from device.update.store.files import COMMITTED, TRIAL, Recovery, SlotRef, StateCorrupt, StoreState
from device.update.store.staging import clean_staging


def recover(store, restarted: bool) -> Recovery:
    """Repairs and cleans ``store`` (a :class:`~device.update.store.store.ModelStore` whose lock is held).

    Returns:
        What it found and did.
    """
    floors, floors_bad = _load(store, store._floors_path, sf.parse_floors, {})
    failed, failed_bad = _load(store, store._failed_path, sf.parse_failed, {})
    s, store_bad = _load(store, store._store_path, sf.parse_store, StoreState())
    if store_bad:
        s = store._write_store(_rebuild(store, floors, failed))
        store._event("store_rebuilt", {"active": s.active.as_json() if s.active else "bundled",
                                       "state": s.state})
    if floors_bad:  # what is installed was committed at some point: the floor is at least that
        floors = {}
        for ref in (s.previous, s.active if s.state == COMMITTED else None):
            if ref is not None:
                floors[ref.name] = max(floors.get(ref.name, -1), ref.version)
        store._write(store._floors_path, sf.dump_floors(floors))
    if failed_bad:
        store._write(store._failed_path, sf.dump_failed({}))
    outcome = None
    if s.active is not None:
        why = sf.check_slot(os.path.join(store.slots_dir, s.active.slot), s.active)
        if why:
            store._event("slot_damaged", dict(s.active.as_json(), reason=why))
            was_trial = s.trial
            s = store._roll_back(s, f"its slot is damaged: {why}", mark=False)
            outcome = Recovery.ROLLED_BACK if was_trial else Recovery.REPAIRED
        elif s.trial and s.active.version in failed.get(s.active.name, {}):  # a rollback cut short
            s = store._roll_back(s, failed[s.active.name][s.active.version]["reason"], mark=False)
            outcome = Recovery.ROLLED_BACK
        elif s.trial:
            restarts = s.restarts + (1 if restarted else 0)
            if restarts > store.max_trial_restarts:
                s = store._roll_back(s, f"the trial was interrupted by {restarts} restarts", mark=True)
                outcome = Recovery.ROLLED_BACK
            else:
                if restarts != s.restarts:
                    s = store._write_store(dataclasses.replace(s, restarts=restarts))
                store._event("trial_resumed", dict(s.active.as_json(), restarts=restarts))
                outcome = Recovery.TRIAL_RESUMED
    if s.previous is not None:
        why = sf.check_slot(os.path.join(store.slots_dir, s.previous.slot), s.previous)
        if why:
            store._event("fallback_dropped", dict(s.previous.as_json(), reason=why))
            s = store._write_store(dataclasses.replace(s, previous=None))
    if s.active is not None and s.state == COMMITTED:
        store._raise_floor(s.active)  # a no-op unless a floor file was lost or rebuilt
    removed = _clean(store, s)
    if removed:
        store._event("store_cleaned", {"removed": removed})
    if outcome is None:
        if store_bad or floors_bad or failed_bad:
            outcome = Recovery.REPAIRED
        else:
            outcome = Recovery.COMMITTED if s.active is not None else Recovery.BUNDLED
    return outcome


def _load(store, path: str, parse, default):
    """Reads a state file; a corrupt one is set aside (an event) and ``default`` returned with True."""
    try:
        return sf.read_state(path, parse, default), False
    except StateCorrupt as exc:
        store._set_aside(path, exc)
        return default, True
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _rebuild(store, floors: dict, failed: dict) -> StoreState:
    """A state for a set-aside ``store.json``, from the slots' own records: the newest committed model (at
    or below its floor) serves, with the other committed one as its fallback; with no committed one, the
    newest slot resumes as a trial; with none that checks out, the bundled model."""
    candidates = []
    for slot in sf.SLOTS:
        directory = os.path.join(store.slots_dir, slot)
        if not os.path.isdir(directory):
            continue
        try:
            name, version, _files = sf.read_meta(directory)
        except StateCorrupt:
            continue
        ref = SlotRef(slot, name, version)
        if sf.check_slot(directory, ref) is None and version not in failed.get(name, {}):
            candidates.append(ref)
    candidates.sort(key=lambda r: r.version, reverse=True)
    committed = [r for r in candidates if r.version <= floors.get(r.name, -1)]
    now = store._clock.time()
    if committed:
        return StoreState(committed[0], COMMITTED, now, 0, committed[1] if len(committed) > 1 else None)
    if candidates:
        return StoreState(candidates[0], TRIAL, now, 0, None)
    return StoreState()


def _clean(store, s: StoreState) -> list:
    """Removes stray staging, unreferenced slots and temporary state files; returns what went."""
    removed = clean_staging(store.staging_dir)
    keep = {r.slot for r in (s.active, s.previous) if r is not None}
    try:
        names = os.listdir(store.slots_dir)
    except FileNotFoundError:
        names = []
    gone = []
    for n in names:
        if n not in keep:
            path = os.path.join(store.slots_dir, n)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            gone.append(f"slots/{n}")
    if gone:
        fsync_dir(store.slots_dir)
    tmp = [n for n in os.listdir(store.root) if n.startswith(".") and n.endswith(".tmp")]
    for n in tmp:  # a write_atomic cut short before its rename
        os.unlink(os.path.join(store.root, n))
    return removed + gone + tmp + _clean_metadata(os.path.join(store.root, "metadata"), store._clock.time())


def _clean_metadata(directory: str, now: float, min_age_s: float = 60.0) -> list:
    """Temporary files a refresh cut short left in the TUF metadata directory (our ``.NAME.XXXX.tmp``, python-tuf's
    ``tmpXXXXXXXX`` of older boards): every file that belongs there ends in ``.json``, ``root.json`` is a link and
    ``root_history`` a directory. Only files older than ``min_age_s`` go, so a refresh running now outside the
    store lock (the CLI's ``check``) keeps its own; ``now`` is the store's clock. ``root_history/`` is cleaned
    too: each root is written beside its final name there."""
    gone = []
    for sub in ("", "root_history"):
        try:
            entries = list(os.scandir(os.path.join(directory, sub) if sub else directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.name.endswith(".json") or not e.is_file(follow_symlinks=False):
                continue
            try:
                if now - e.stat(follow_symlinks=False).st_mtime < min_age_s:
                    continue
                os.unlink(e.path)
            except FileNotFoundError:
                continue
            gone.append(f"metadata/{sub + '/' if sub else ''}{e.name}")
    return gone
