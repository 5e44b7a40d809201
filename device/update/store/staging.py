"""The A/B store's staging side: the slot being filled, the free-space check, and the staging clean-up.

See :mod:`device.update.store.store` for the workflow; nothing here touches ``store.json`` except
:func:`ensure_space`, which may drop the fallback slot when that alone makes room for an install.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil

from device.statefile import fsync_dir, write_atomic
from device.update.errors import NoSpace, StoreError, UpdateError, ValidationFailed
from device.update.store.files import SLOT_META, SlotRef, StoreState

DOWNLOADS = "downloads"  # the installer's resumable downloads: the only thing in staging a clean-up keeps


class Staging:
    """The slot being filled. It holds the store lock until it is activated or aborted (a ``with`` block
    aborts it on exit unless it was activated).

    Attributes:
        slot: the letter of the slot it will become.
        name: the release's model name.
        version: the release's version.
        dir: where the installer writes the model's files.
        closed: activated or aborted: the lock is released and the directory is no longer staging's.
    """

    def __init__(self, store, slot: str, name: str, version: int, directory: str):
        self.store, self.slot, self.name, self.version, self.dir = store, slot, name, version, directory
        self.closed = False
        self.plaintexts: dict = {}  # {variant: signed plaintext sha256}, recorded with the floors at the switch

    def path(self, rel: str) -> str:
        """The absolute path of ``rel`` inside the staged model (its parent directories are created).

        Raises:
            ValidationFailed: ``rel`` is absolute or leaves the model directory.
            NoSpace: the disk is full.
        """
        parts = rel.replace("\\", "/").split("/")
        if not rel or os.path.isabs(rel) or any(p in ("", ".", "..") for p in parts) or rel == SLOT_META:
            raise ValidationFailed(f"model file name {rel!r}: must be a relative path inside the model")
        full = os.path.join(self.dir, *parts)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
        except OSError as exc:
            raise os_error(exc, f"cannot create the directory of {rel} in staging", space=True) from exc
        return full

    def write_file(self, rel: str, data: bytes) -> None:
        """Writes one file of the model and fsyncs it.

        Raises:
            ValidationFailed: a bad file name.
            NoSpace: the disk is full.
        """
        try:
            write_atomic(self.path(rel), data, 0o644)
        except OSError as exc:
            raise os_error(exc, f"cannot write {rel} in staging", space=True) from exc

    def fail(self, reason: str) -> None:
        """Marks this version failed on this board (never installed again: its model does not pass here), then
        discards it like :meth:`abort`. Validation failures call it; a download or a grant problem does not."""
        if not self.closed:
            self.store._mark_failed(SlotRef(self.slot, self.name, self.version), reason)
        self.abort()

    def abort(self) -> None:
        """Discards the staged files and releases the lock (nothing outside staging was touched)."""
        if not self.closed:
            self.closed = True
            shutil.rmtree(self.dir, ignore_errors=True)
            self.store._lock.release()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def ensure_space(store, s: StoreState, slot: str, size_hint: int) -> None:
    """Refuses an install the disk cannot take; drops the fallback when that alone makes the room.

    Raises:
        NoSpace: even without the fallback slot, ``size_hint`` + the reserve is more than is free.
        OSError: the slot cannot be moved away.
    """
    need = max(0, size_hint) + store.reserve_bytes
    os.makedirs(store.staging_dir, exist_ok=True)
    st = os.statvfs(store.staging_dir)
    free = st.f_bavail * st.f_frsize
    if free >= need:
        return
    target = os.path.join(store.slots_dir, slot)
    reclaim = tree_bytes(target)
    if free + reclaim < need:
        raise NoSpace(f"the install needs {need} bytes free ({size_hint} for the model and its download, "
                      f"{store.reserve_bytes} kept in reserve) and {store.root} has {free}"
                      + (f" (+{reclaim} in the fallback slot)" if reclaim else ""))
    if s.previous is not None and s.previous.slot == slot:  # unpinned before it goes: never a dangling fallback
        store._write_store(dataclasses.replace(s, previous=None))
        store._event("fallback_dropped", dict(s.previous.as_json(), reason="space for an install"))
    trash = os.path.join(store.staging_dir, f"trash-{slot}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(target, trash)
    fsync_dir(store.slots_dir)
    shutil.rmtree(trash, ignore_errors=True)


def clean_staging(staging_dir: str) -> list:
    """Removes everything in staging but the downloads; returns what went (``staging/<name>``)."""
    removed = []
    try:
        names = os.listdir(staging_dir)
    except FileNotFoundError:
        return removed
    for n in sorted(names):
        if n == DOWNLOADS:
            continue
        path = os.path.join(staging_dir, n)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        removed.append(f"staging/{n}")
    if removed:
        fsync_dir(staging_dir)
    return removed


def tree_bytes(path: str) -> int:
    """The bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for n in files:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def os_error(exc: OSError, what: str, space: bool = False) -> UpdateError:
    """An OSError as the family's error: a full disk while staging is no_space, anything else model_store_error."""
    if space and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: the disk is full ({exc.strerror})")
    return StoreError(f"{what}: {exc.strerror or exc}")
