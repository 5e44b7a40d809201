"""Which model version an install takes: what serves now, the candidate version, and the refused releases.

A model *version* is every release (one per variant) of one name and version. The candidate is the newest
version of the model that serves now that is newer than what is installed, not below the store's floor, not
failed before on this board, with at least one variant that passes the target check (:func:`plan`); an explicit
version is taken as asked, the store's floor and failed list being checked when the install begins
(:func:`explicit`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from device.runtime.manifest import ModelManifest
from device.update.errors import RollbackError, TargetRefused, UpdateError
from device.update.store.store import same_bytes


@dataclass(frozen=True)
class Current:
    """The model that serves now, and the template of the next slot's manifest.

    Attributes:
        name: Its model name. version: Its release version (0 for a model that is not an installed release).
        source: ``store`` (an installed slot) or ``bundled`` (the configured or shipped model).
        manifest: Its manifest. slot: The slot letter, or None. state: ``trial``/``committed``, or None.
    """

    name: str
    version: int
    source: str
    manifest: ModelManifest
    slot: str | None = None
    state: str | None = None

    def as_json(self) -> dict:
        return {"name": self.name, "version": self.version if self.source == "store" else None,
                "source": self.source, "slot": self.slot, "state": self.state}


@dataclass(frozen=True)
class Refusal:
    """A release (or a whole version, ``variant`` None) this board will not install, and why."""

    version: int | None
    variant: str | None
    error: UpdateError
    malformed: bool = False  # a newer release of this model whose signed facts cannot be read

    def as_json(self) -> dict:
        return {"version": self.version, "variant": self.variant, "code": self.error.code, "message": str(self.error)}


@dataclass(frozen=True)
class Candidate:
    """A model version to install: its releases for this board, one per variant."""

    name: str
    version: int
    releases: tuple

    @property
    def size_hint(self) -> int:
        """Bytes the install may write under the store: every ciphertext and every plaintext."""
        total = 0
        for r in self.releases:
            for art in (r.model, r.test_vectors):
                if art is not None:
                    total += art.target.length + art.plaintext_length
        return total

    def as_json(self) -> dict:
        variants = [{"variant": r.variant, "release": r.release_id, "bytes": r.plaintext_length,
                     "download_bytes": r.target.length + (r.test_vectors.target.length if r.test_vectors else 0),
                     "test_vectors": r.test_vectors is not None} for r in self.releases]
        return {"name": self.name, "version": self.version, "variants": variants,
                "download_bytes": sum(v["download_bytes"] for v in variants), "install_bytes": self.size_hint}



def versions(repo, name: str) -> dict:
    """``{version: [Release]}`` of model ``name`` in the verified targets."""
    out: dict = {}
    for r in repo.releases():
        if r.name == name:
            out.setdefault(r.version, []).append(r)
    return out


def for_board(repo, facts, releases) -> tuple:
    """``([Release] that pass the target check, [Refusal] of the others)``."""
    ok, refused = [], []
    for r in releases:
        try:
            repo.check_target(r, facts)
            ok.append(r)
        except TargetRefused as exc:
            refused.append(Refusal(r.version, r.variant, exc))
    return ok, refused


def malformed(path: str, exc: UpdateError, cur: Current) -> Refusal:
    """A model target whose signed facts are malformed, as a refusal: flagged ``malformed`` when it is (or may be,
    its version unreadable) a newer release of the model that serves, which an install must not call up to date."""
    parts = path.split("/")
    mine = len(parts) == 4 and parts[0] == "models" and parts[1] == cur.name
    m = re.fullmatch(r"([0-9]{1,9})\.tflite\.age", parts[-1]) if mine else None
    version = int(m.group(1)) if m else None
    return Refusal(version, parts[2] if mine else None, exc,
                   malformed=mine and (version is None or version > cur.version))


def plan(repo, store, facts, cur: Current) -> tuple:
    """``(Candidate or None, [Refusal])``: the newest installable version above what serves, and why each newer
    release (and each malformed model target) is refused, newest first."""
    listed = versions(repo, cur.name)
    refused = [malformed(path, exc, cur) for path, exc in zip(getattr(repo, "refused_paths", ()), repo.refused)]
    floor, failed = store.floor(cur.name), store.failed_versions(cur.name)
    seen = store.installed_plaintexts(cur.name)
    for v in sorted(listed, reverse=True):
        if v <= cur.version:
            break
        if floor is not None and v < floor:
            refused.append(Refusal(v, None, RollbackError(f"{cur.name} v{v} is below this board's floor v{floor} "
                                                          f"(its highest committed version)")))
            continue
        if v in failed:
            refused.append(Refusal(v, None, RollbackError(f"{cur.name} v{v} failed on this board before and is "
                                                          f"never retried ({failed[v]['reason']})")))
            continue
        same = [(r.variant, seen[(r.variant, r.plaintext_sha256)], r.plaintext_sha256) for r in listed[v]
                if seen.get((r.variant, r.plaintext_sha256), v) < v]
        if same:
            variant, older, sha = same[0]
            refused.append(Refusal(v, None, RollbackError(same_bytes(cur.name, v, variant, older, sha))))
            continue
        ok, why = for_board(repo, facts, listed[v])
        refused.extend(why)
        if ok:
            return Candidate(cur.name, v, tuple(ok)), refused
    return None, refused


def explicit(repo, facts, cur: Current, version: int) -> Candidate:
    """The releases of ``version`` for this board.

    Raises:
        TargetRefused: No release of that version, or none for this board (the first refusal).
    """
    listed = versions(repo, cur.name)
    if version not in listed:
        have = ", ".join(str(v) for v in sorted(listed)) or "none"
        raise TargetRefused(f"{cur.name} v{version}: no such release in the repository (versions listed: {have})")
    ok, refused = for_board(repo, facts, listed[version])
    if not ok:
        raise refused[0].error
    return Candidate(cur.name, version, tuple(ok))
