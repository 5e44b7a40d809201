"""Publishing and key rotation for the operator's update repository (``fieldnode repo publish|rotate``).

``publish`` turns what is staged into what boards fetch. It needs only the online keys (snapshot and
timestamp) unless asked to re-sign an offline role (``--resign targets`` to push its expiry out): the staged
targets and root were signed with the offline keys by the command that staged them. Run it from cron to keep
the timestamp fresh; with nothing staged it signs a new timestamp only (and a new snapshot when the old one
would expire first), so an unchanged repository costs a board one small file per refresh.

``rotate --role R`` replaces the keys of one role. Every rotation changes the root (it lists every role's keys),
so it needs the offline root keys: the new root is signed by a threshold of the keys the published root trusts
for root *and* by a threshold of its own, which is what lets a board walk from one root to the next. Rotating
the targets keys re-signs the current targets with the new keys too. The replaced keys move to ``retired/``;
until the new root is published they still sign, and ``publish`` signs the snapshot and timestamp with the old
online keys too. A board walks the root chain before it reads a timestamp, so only a refresh under way during
that publish (no ``N+1.root.json`` a moment before, the new timestamp now) checks them against the old root.
"""

from __future__ import annotations

import copy
import datetime

from device.update.errors import RepositoryError
from tools.repo import keys as repo_keys
from tools.repo.meta import DEFAULT_DAYS, OFFLINE_ROLES, ROLES, Repository, check_count, expiry, utcnow


def _verify(root, role: str, md, what: str) -> None:
    result = root.get_verification_result(role, md.signed_bytes, md.signatures)
    if not result:
        raise RepositoryError(f"{what}: signed by {len(result.signed)} of the {result.threshold} {role} keys root "
                              f"version {root.version} requires")


def publish(repo: Repository, *, resign: tuple = (), days: dict | None = None,
            now: datetime.datetime | None = None) -> dict:
    """Publishes the staged changes with new snapshot and timestamp versions.

    Args:
        repo: The repository (its ``offline_keys`` are read only for ``resign``).
        resign: Offline roles (``"root"``, ``"targets"``) to re-sign with a new version and expiry.
        days: ``{role: days}`` until expiry for what is signed now, over :data:`DEFAULT_DAYS`.
        now: The signing time.

    Returns:
        ``{"published": {role: version}, "expires": {role: iso}, "root_version", "targets_version"}``.

    Raises:
        RepositoryError: A staged file is not signed by the threshold the new root requires, or keys are missing.
    """
    from tuf.api.metadata import MetaFile

    asked = dict(days or {})
    days = DEFAULT_DAYS | asked
    now = now or utcnow()
    for role in resign:
        if role not in OFFLINE_ROLES:
            raise RepositoryError(f"--resign {role}: only root and targets are re-signed on request (snapshot and "
                                  f"timestamp are signed at every publish)")
    with repo.lock():
        old_root = repo.published("root")
        new_root = repo.staged("root")
        offline = None
        if resign:
            offline = repo_keys.load_signers(repo.offline_keys)
        if "root" in resign:
            base = new_root or copy.deepcopy(old_root)
            if new_root is None:
                base.signed.version = old_root.signed.version + 1
            base.signed.expires = expiry(now, days["root"])
            repo.sign(base, "root", offline, [old_root.signed, base.signed], where=repo.offline_keys)
            new_root = base
        if new_root is not None:
            _verify(old_root.signed, "root", new_root, f"staged root version {new_root.signed.version}")
            _verify(new_root.signed, "root", new_root, f"staged root version {new_root.signed.version}")
        root = (new_root or old_root).signed
        targets = repo.staged("targets")
        if "targets" in resign:
            base = targets or copy.deepcopy(repo.published("targets"))
            if targets is None:
                base.signed.version = repo.published("targets").signed.version + 1
            base.signed.expires = expiry(now, days["targets"])
            repo.sign(base, "targets", offline, [root], where=repo.offline_keys)
            targets = base
        if targets is not None:
            _verify(root, "targets", targets, f"staged targets version {targets.signed.version}")
        else:
            # A staged root must still trust the keys that signed the published targets.
            _verify(root, "targets", repo.published("targets"), "the published targets")
        online = repo_keys.load_signers(repo.online_keys)
        trusting = [root]
        also = [old_root.signed] if new_root is not None else []
        old_snapshot = repo.published("snapshot")
        timestamp = copy.deepcopy(repo.published("timestamp"))
        timestamp.signed.version += 1
        timestamp.signed.expires = expiry(now, days["timestamp"])
        snapshot = None
        if targets is not None or new_root is not None or old_snapshot.signed.expires < timestamp.signed.expires \
                or "snapshot" in asked:
            snapshot = copy.deepcopy(old_snapshot)
            snapshot.signed.version += 1
            snapshot.signed.expires = max(expiry(now, days["snapshot"]), timestamp.signed.expires)
            if targets is not None:
                snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
            repo.sign(snapshot, "snapshot", online, trusting, also, where=repo.online_keys)
        snap_version = (snapshot or old_snapshot).signed.version
        timestamp.signed.snapshot_meta = MetaFile(version=snap_version)
        repo.sign(timestamp, "timestamp", online, trusting, also, where=repo.online_keys)
        # The order a board reads them backwards: timestamp.json last is the commit point.
        published = {}
        if targets is not None:
            repo.write_metadata(f"{targets.signed.version}.targets.json", targets)
            published["targets"] = targets.signed.version
        if new_root is not None:
            repo.write_metadata(f"{new_root.signed.version}.root.json", new_root)
            repo.write_metadata("root.json", new_root)
            published["root"] = new_root.signed.version
        if snapshot is not None:
            repo.write_metadata(f"{snap_version}.snapshot.json", snapshot)
            published["snapshot"] = snap_version
        repo.write_metadata("timestamp.json", timestamp)
        published["timestamp"] = timestamp.signed.version
        for role in ("targets", "root"):
            repo.unstage(role)
        return {"published": published,
                "expires": {r: repo.published(r).signed.expires.isoformat() for r in ROLES}}


def rotate(repo: Repository, role: str, *, count: int | None = None, threshold: int | None = None,
           days: dict | None = None, now: datetime.datetime | None = None) -> dict:
    """Replaces the keys of ``role`` with fresh ones and stages the new root (publish makes it live).

    Args:
        repo: The repository; its ``offline_keys`` must hold a threshold of the published root's root keys.
        role: ``root``, ``targets``, ``snapshot`` or ``timestamp``.
        count: How many new keys (default: as many as now).
        threshold: How many must sign (default: as now).
        days: ``{role: days}`` for the new root's (and targets') expiry.
        now: The signing time.

    Returns:
        ``{"role", "root_version", "new_keyids", "threshold", "retired"}``.

    Raises:
        RepositoryError: An unknown role, a bad count, or too few root keys to sign the new root.
    """
    if role not in ROLES:
        raise RepositoryError(f"--role {role}: expected one of {', '.join(ROLES)}")
    days = DEFAULT_DAYS | dict(days or {})
    now = now or utcnow()
    with repo.lock():
        published = repo.published("root")
        staged = repo.staged("root")
        root = staged or copy.deepcopy(published)
        if staged is None:
            root.signed.version = published.signed.version + 1
        old_keyids = list(root.signed.roles[role].keyids)
        n = count or len(old_keyids)
        k = threshold or min(root.signed.roles[role].threshold, n)
        check_count(role, n, k)
        signers = repo_keys.load_signers(repo.offline_keys)
        # Check the old root keys are here before making any key: a failed rotation leaves nothing behind.
        available = [kid for kid in published.signed.roles["root"].keyids if kid in signers]
        if len(available) < published.signed.roles["root"].threshold:
            raise RepositoryError(f"rotate {role}: needs {published.signed.roles['root'].threshold} of the published "
                                  f"root's root keys to sign the new root; found {len(available)} in "
                                  f"{repo.offline_keys} (pass --keys DIR)")
        key_dir = repo.offline_keys if role in OFFLINE_ROLES else repo.online_keys
        new = [repo_keys.generate_signer(key_dir, role) for _ in range(n)]
        for keyid in old_keyids:
            root.signed.revoke_key(keyid, role)
        for signer in new:
            root.signed.add_key(signer.public_key, role)
            signers[signer.public_key.keyid] = signer
        root.signed.roles[role].threshold = k
        root.signed.expires = expiry(now, days["root"])
        repo.sign(root, "root", signers, [published.signed, root.signed], where=repo.offline_keys)
        if role == "targets":
            targets = repo.staged("targets") or copy.deepcopy(repo.published("targets"))
            targets.signed.version = repo.published("targets").signed.version + 1
            targets.signed.expires = max(targets.signed.expires, expiry(now, days["targets"]))
            repo.sign(targets, "targets", signers, [root.signed], where=repo.offline_keys)
            repo.stage(targets)
        repo.stage(root)
        retired = repo_keys.retire(key_dir, old_keyids)
        return {"role": role, "root_version": root.signed.version, "threshold": k,
                "new_keyids": [s.public_key.keyid for s in new], "retired": retired}
