"""``fieldnode repo export DIR --usb OUT``: a self-contained copy of the repository for a technician's stick.

The copy holds what a board needs and nothing secret: every root version (a board may still trust root 1),
the current targets and snapshot, a timestamp that lives ``--valid-days`` (default 30: a field trip), the
targets the current metadata lists and the grants of those releases. A board reads it through the same TUF
checks as the online repository (the directory fetcher), so a stick is no more trusted than a web server.

Timestamp versions stay monotonic across the two copies: the stick gets version T+1 with the long expiry and
the online repository is re-published at T+2 with its usual one, so a board never sees the same version with
two contents, and the long-lived timestamp never sits on the server where it could be replayed online. A
board that has already seen a newer timestamp than the stick's refuses the stick (rollback protection):
export again. Root and targets must outlive the stick; the export refuses otherwise (``publish --resign``).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil

from device.statefile import AtomicFile, fsync_dir, write_atomic
from device.update.errors import RepositoryError
from tools.repo import keys as repo_keys
from tools.repo.meta import DEFAULT_DAYS, Repository, expiry, utcnow, write_md
from tools.repo.release import models

MARKER = "fieldnode-export.json"
DEFAULT_VALID_DAYS = 30.0


def _copy(src: str, dst: str) -> None:
    """Copies one file durably (the stick may be pulled right after the command returns)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as fin, AtomicFile(dst, 0o644) as out:
        shutil.copyfileobj(fin, out.file, 1 << 20)


def _prepare(out: str) -> None:
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise RepositoryError(f"--usb {out}: exists and is not a directory")
        entries = os.listdir(out)
        if entries and MARKER not in entries:
            raise RepositoryError(f"--usb {out}: not empty and not an earlier export (no {MARKER}); name an empty or "
                                  f"new directory")
        for sub in ("metadata", "targets", "grants"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)


def export(repo: Repository, out: str, *, valid_days: float = DEFAULT_VALID_DAYS, days: dict | None = None,
           now: datetime.datetime | None = None) -> dict:
    """Writes a self-contained copy of the published repository to ``out`` with a long-lived timestamp.

    Args:
        repo: The repository (its online keys sign the two new timestamps).
        out: An empty or new directory, or an earlier export (replaced).
        valid_days: How long the stick's timestamp (and snapshot) stay valid.
        days: ``{"timestamp": days}`` for the online repository's new timestamp.
        now: The signing time.

    Returns:
        ``{"out", "valid_until", "timestamp_version", "files", "bytes"}``.

    Raises:
        RepositoryError: Unpublished changes, root or targets expiring before the stick, missing online keys, or
            ``out`` not usable.
    """
    from tuf.api.metadata import MetaFile

    days = DEFAULT_DAYS | dict(days or {})
    now = now or utcnow()
    if not valid_days > 0:
        raise RepositoryError(f"--valid-days {valid_days}: expected a number of days above 0")
    until = expiry(now, valid_days)
    if os.path.abspath(out).startswith(os.path.abspath(repo.path) + os.sep):
        raise RepositoryError(f"--usb {out}: inside the repository; name a directory on the stick")
    with repo.lock():
        staged = repo.staged_roles()
        if staged:
            raise RepositoryError(f"export: {', '.join(staged)} staged but not published; run fieldnode repo publish "
                                  f"first (the stick carries what boards would see online)")
        for role in ("root", "targets"):
            expires = repo.published(role).signed.expires
            if expires < until:
                raise RepositoryError(f"export: {role} expires {expires.isoformat()}, before the stick's "
                                      f"{until.isoformat()}; run fieldnode repo publish --resign {role} first, or "
                                      f"ask for fewer --valid-days")
        root = repo.published("root").signed
        online = repo_keys.load_signers(repo.online_keys)
        snapshot = repo.published("snapshot")
        new_snapshot = None
        if snapshot.signed.expires < until:
            new_snapshot = copy.deepcopy(snapshot)
            new_snapshot.signed.version += 1
            new_snapshot.signed.expires = until
            repo.sign(new_snapshot, "snapshot", online, [root], where=repo.online_keys)
            snapshot = new_snapshot
        stick = copy.deepcopy(repo.published("timestamp"))
        stick.signed.version += 1
        stick.signed.expires = until
        stick.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        repo.sign(stick, "timestamp", online, [root], where=repo.online_keys)
        server = copy.deepcopy(stick)
        server.signed.version += 1
        server.signed.expires = expiry(now, days["timestamp"])
        repo.sign(server, "timestamp", online, [root], where=repo.online_keys)

        try:
            _prepare(out)
            files = []
            meta_out = os.path.join(out, "metadata")
            for version in repo.root_versions():
                name = f"{version}.root.json"
                _copy(os.path.join(repo.metadata_dir, name), os.path.join(meta_out, name))
                files.append(f"metadata/{name}")
            _copy(os.path.join(repo.metadata_dir, "root.json"), os.path.join(meta_out, "root.json"))
            targets = repo.published("targets")
            name = f"{targets.signed.version}.targets.json"
            _copy(os.path.join(repo.metadata_dir, name), os.path.join(meta_out, name))
            write_md(os.path.join(meta_out, f"{snapshot.signed.version}.snapshot.json"), snapshot)
            files += [f"metadata/{name}", f"metadata/{snapshot.signed.version}.snapshot.json"]
            size = 0
            for path, info in sorted(targets.signed.targets.items()):
                directory, _, base = path.rpartition("/")
                stored = f"{directory}/{info.hashes['sha256']}.{base}".lstrip("/")
                src = os.path.join(repo.targets_dir, *stored.split("/"))
                if not os.path.isfile(src):
                    raise RepositoryError(f"export: target {path} is listed but {src} is missing")
                _copy(src, os.path.join(out, "targets", *stored.split("/")))
                files.append(f"targets/{stored}")
                size += info.length
            for rel in sorted({c["release"] for _, _, c in models(targets.signed)}):
                gdir = os.path.join(repo.grants_dir, rel)
                for entry in sorted(os.listdir(gdir)) if os.path.isdir(gdir) else []:
                    if entry.endswith(".age"):
                        _copy(os.path.join(gdir, entry), os.path.join(out, "grants", rel, entry))
                        files.append(f"grants/{rel}/{entry}")
            write_md(os.path.join(meta_out, "timestamp.json"), stick)  # last: the stick's commit point
            files.append("metadata/timestamp.json")
            for directory, _, _ in os.walk(out):
                fsync_dir(directory)
            info = {"valid_until": until.isoformat(), "timestamp_version": stick.signed.version,
                    "snapshot_version": snapshot.signed.version, "targets_version": targets.signed.version,
                    "root_version": root.version, "exported": now.isoformat()}
            write_atomic(os.path.join(out, MARKER), (json.dumps(info, indent=1) + "\n").encode(), mode=0o644)
        except OSError as exc:
            raise RepositoryError(f"--usb {out}: cannot write the export ({exc.strerror or exc}"
                                  f"{': ' + exc.filename if exc.filename else ''})") from exc
        # The online repository moves past the stick's version only once the stick is complete.
        if new_snapshot is not None:
            repo.write_metadata(f"{new_snapshot.signed.version}.snapshot.json", new_snapshot)
        repo.write_metadata("timestamp.json", server)
        return {"out": out, "files": len(files), "target_bytes": size, **info,
                "online_timestamp_version": server.signed.version}

