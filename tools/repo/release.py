"""Releases and grants of the operator's update repository (``fieldnode repo add-model|grant|status``).

A release is one model file (one name, variant and version) encrypted once, with age, to a fresh release key.
Its TUF target is the ciphertext; the target's signed ``custom`` carries the plaintext facts a board checks
after decrypting and before installing (see docs/updates.md, "What a release signs")::

    {"kind": "model", "name": "vibration", "variant": "full", "version": 3, "release": "vibration-full-3-1a2b3c4d",
     "plaintext": {"sha256": "...", "length": 123456}, "hwclass": ["rpi4"], "ring": "stable",
     "min_agent": "0.4.0", "test_vectors": {"target": "models/...", "sha256": "...", "length": 4567} or null,
     "encryption": "age"}

The release identity (the age secret key) stays in ``DIR/keys/releases/<release>.key``, never published. A
board gets it from its grant, ``grants/<release>/<sha256(device id)[:16] hex>.age``: the identity encrypted to
that board's own age recipient. Grants are outside the TUF metadata on purpose (a forged or swapped grant can
only fail to open or fail to decrypt a ciphertext whose hash TUF verified), so a refresh costs a board the same
whatever the size of the fleet.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import os
import re
import secrets

from device.statefile import AtomicFile, write_atomic
from device.update.errors import RepositoryError, UpdateError
# The naming rules and the facts schema are shared with the board: one module, two importers.
from device.update.layout import DEFAULT_RING, MAX_VERSION, grant_path, model_facts, model_target_path, vectors_facts
from device.update.layout import NAME_RE as _NAME_RE
from device.update.layout import SEMVER_RE as _SEMVER_RE
from device.update.layout import vectors_ref, vectors_target_path
from tools.repo import keys as repo_keys
from tools.repo.meta import DEFAULT_DAYS, Repository, expiry, utcnow

_DEVICE_RE = re.compile(r"[\x21-\x7e]{1,128}\Z")  # printable ASCII, no spaces: what fits a line of a grants file


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise RepositoryError(f"{what} {value!r}: expected 1-64 characters from A-Z, a-z, 0-9, '.', '_', '-', "
                              f"starting with a letter or digit")
    return value


def _age():
    from device.update import age

    return age


def _encrypt_target(repo: Repository, src_path: str, target_path: str, recipient: str):
    """Encrypts ``src_path`` to ``recipient`` into the targets directory under its consistent-snapshot name.

    Returns:
        ``(TargetFile, plaintext sha256 hex, plaintext length)``.
    """
    from tuf.api.metadata import TargetFile

    directory = os.path.join(repo.targets_dir, *target_path.split("/")[:-1])
    basename = target_path.rsplit("/", 1)[-1]
    try:
        os.makedirs(directory, exist_ok=True)
        af = AtomicFile(os.path.join(directory, basename), 0o644)  # public: served as it is
    except OSError as exc:
        raise RepositoryError(f"{directory}: cannot write the target ({exc.strerror or exc})") from exc
    try:
        with af, open(src_path, "rb") as src:
            digest = hashlib.sha256()
            length = _age().encrypt(src, af.file, [recipient], chunk_hook=digest.update)
            af.sync()
            af.file.seek(0)
            info = TargetFile.from_data(target_path, af.file, ["sha256"])
            af.path = os.path.join(directory, f"{info.hashes['sha256']}.{basename}")  # its consistent name
    except OSError as exc:
        raise RepositoryError(f"{exc.filename or src_path}: cannot read or encrypt it "
                              f"({exc.strerror or exc})") from exc
    return info, digest.hexdigest(), length


def _file_size(path: str, what: str) -> int:
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise RepositoryError(f"{what} {path}: {exc.strerror or exc}") from exc
    if not os.path.isfile(path):
        raise RepositoryError(f"{what} {path}: not a regular file")
    if size == 0:
        raise RepositoryError(f"{what} {path}: empty file")
    return size


def models(targets) -> list:
    """The model releases a targets payload lists: ``[(target path, TargetFile, custom dict)]``."""
    out = []
    for path, info in sorted(targets.targets.items()):
        custom = info.unrecognized_fields.get("custom")
        if isinstance(custom, dict) and custom.get("kind") == "model":
            out.append((path, info, custom))
    return out


def add_model(repo: Repository, *, model: str, name: str, variant: str, version: int, hwclass=(),
              ring: str = DEFAULT_RING, min_agent: str | None = None, test_vectors: str | None = None,
              days: dict | None = None, now: datetime.datetime | None = None) -> dict:
    """Encrypts a model once to a fresh release key, lists it in the targets metadata and stages it, signed.

    Args:
        repo: The repository; its ``offline_keys`` must hold a threshold of the targets keys.
        model: The plaintext ``.tflite`` file.
        name: The model name (as in model.json). variant: The variant name. version: The release version,
            above every version listed for this name and variant.
        hwclass: Hardware classes allowed to install it (empty: any).
        ring: The rollout ring. min_agent: The lowest agent version (X.Y.Z) that may install it.
        test_vectors: A test-vector file, encrypted to the same release key as a second target.
        days: ``{"targets": days}`` until the targets metadata expires.
        now: The signing time.

    Returns:
        ``{"release", "target", "length", "plaintext_sha256", "plaintext_length", "targets_version",
        "test_vectors"}``.

    Raises:
        RepositoryError: A bad argument, a version not above the highest listed, missing targets keys.
    """
    _check_name("--name", name)
    _check_name("--variant", variant)
    _check_name("--ring", ring)
    hwclass = sorted({_check_name("--hwclass", c) for c in hwclass})
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise RepositoryError(f"--version {version!r}: expected an integer from 1 to {MAX_VERSION}")
    if min_agent is not None and not _SEMVER_RE.match(min_agent):
        raise RepositoryError(f"--min-agent {min_agent!r}: expected a version like 0.4.0")
    _file_size(model, "--model")
    if test_vectors is not None:
        _file_size(test_vectors, "--test-vectors")
    days = DEFAULT_DAYS | dict(days or {})
    now = now or utcnow()
    with repo.lock():
        published = repo.published("targets")
        targets = repo.staged("targets") or copy.deepcopy(published)
        targets.signed.version = published.signed.version + 1
        listed = [c["version"] for _, _, c in models(targets.signed)
                  if c.get("name") == name and c.get("variant") == variant and isinstance(c.get("version"), int)]
        if listed and version <= max(listed):
            raise RepositoryError(f"--version {version}: {name}/{variant} already lists version {max(listed)}; a new "
                                  f"release needs a higher version (boards refuse to go back)")
        root = repo.current("root").signed
        signers = repo_keys.load_signers(repo.offline_keys)
        have = [k for k in root.roles["targets"].keyids if k in signers]
        if len(have) < root.roles["targets"].threshold:  # before any file is made: nothing to clean up
            raise RepositoryError(f"add-model: needs {root.roles['targets'].threshold} of the targets keys to sign; "
                                  f"found {len(have)} in {repo.offline_keys} (pass --keys DIR)")
        release = f"{name}-{variant}-{version}-{secrets.token_hex(4)}"
        identity, recipient = _age().generate_identity()
        key_path = os.path.join(repo.releases_dir, f"{release}.key")
        repo_keys.write_secret(key_path, (identity + "\n").encode())
        vectors = None
        if test_vectors is not None:
            # keeps .npz; never a path character
            vpath = vectors_target_path(name, variant, version, os.path.splitext(test_vectors)[1])
            vinfo, vsha, vlen = _encrypt_target(repo, test_vectors, vpath, recipient)
            vinfo.unrecognized_fields["custom"] = vectors_facts(name=name, variant=variant, version=version,
                                                                release=release, sha256=vsha, length=vlen)
            targets.signed.targets[vpath] = vinfo
            vectors = vectors_ref(vpath, vsha, vlen)
        mpath = model_target_path(name, variant, version)
        info, sha, length = _encrypt_target(repo, model, mpath, recipient)
        info.unrecognized_fields["custom"] = model_facts(
            name=name, variant=variant, version=version, release=release, sha256=sha, length=length,
            hwclass=hwclass, ring=ring, min_agent=min_agent, test_vectors=vectors)
        targets.signed.targets[mpath] = info
        targets.signed.expires = max(targets.signed.expires, expiry(now, days["targets"]))
        repo.sign(targets, "targets", signers, [root], where=repo.offline_keys)
        repo.stage(targets)
        return {"release": release, "target": mpath, "length": info.length, "plaintext_sha256": sha,
                "plaintext_length": length, "targets_version": targets.signed.version, "test_vectors": vectors,
                "release_key": key_path}


def read_recipients(path: str) -> list:
    """Reads a grants file: one ``DEVICE-ID age1...`` per line; blank lines and ``#`` comments skipped.

    Raises:
        RepositoryError: The file cannot be read, or a line is not two fields (names the line).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"--recipients-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") \
            from exc
    out = []
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise RepositoryError(f"--recipients-file {path}, line {number}: expected 'DEVICE-ID age1...', got "
                                  f"{len(fields)} field(s)")
        out.append((fields[0], fields[1]))
    if not out:
        raise RepositoryError(f"--recipients-file {path}: lists no device")
    return out


def _releases(repo: Repository, release, name, variant, version) -> list:
    listed = models(repo.current("targets").signed)
    if release is not None:
        found = [c["release"] for _, _, c in listed if c.get("release") == release]
        if not found:
            raise RepositoryError(f"--release {release}: no such release in the targets metadata (see fieldnode repo "
                                  f"status)")
        return found
    if name is None or version is None:
        raise RepositoryError("grant: name the release with --release REL, or --name N --version V [--variant V]")
    found = [c["release"] for _, _, c in listed if c.get("name") == name and c.get("version") == version
             and (variant is None or c.get("variant") == variant)]
    if not found:
        which = f"{name}/{variant}" if variant else name
        raise RepositoryError(f"grant: no release of {which} version {version} in the targets metadata")
    return found


def grant(repo: Repository, devices: list, *, release: str | None = None, name: str | None = None,
          variant: str | None = None, version: int | None = None) -> dict:
    """Writes each board's release-key file: the release identity encrypted to the board's age recipient.

    Idempotent: granting again rewrites the file (a board that was re-keyed gets a file it can open). With
    ``--name`` and ``--version`` every variant of that version is granted (the runtime swaps variants).

    Args:
        repo: The repository (its ``keys/releases`` must hold the release identities).
        devices: ``[(device id, age recipient)]``.
        release, name, variant, version: Which release(s).

    Returns:
        ``{"releases": [...], "devices": n, "files": [relative paths]}``.

    Raises:
        RepositoryError: An unknown release, a missing release key, a bad device id or recipient. Every input is
            checked before any file is written.
    """
    age = _age()
    for device_id, recipient in devices:
        if not isinstance(device_id, str) or not _DEVICE_RE.match(device_id):
            raise RepositoryError(f"--device {device_id!r}: expected 1-128 printable characters without spaces")
        try:
            age.parse_recipient(recipient)
        except UpdateError as exc:
            raise RepositoryError(f"device {device_id}: recipient {recipient!r} is not an age X25519 recipient "
                                  f"(age1...): {exc}") from exc
    with repo.lock():
        releases = _releases(repo, release, name, variant, version)
        identities = {}
        for rel in releases:
            path = os.path.join(repo.releases_dir, f"{rel}.key")
            identities[rel] = repo_keys.read_secret(path, f"release key of {rel}")
        files = []
        for rel in releases:
            for device_id, recipient in devices:
                relative = grant_path(rel, device_id)
                path = os.path.join(repo.path, *relative.split("/"))
                try:
                    write_atomic(path, age.encrypt_bytes(identities[rel], [recipient]), mode=0o644)
                except OSError as exc:
                    raise RepositoryError(f"{path}: cannot write the grant ({exc.strerror or exc})") from exc
                files.append(relative)
        return {"releases": releases, "devices": len(devices), "files": files}


def status(repo: Repository, now: datetime.datetime | None = None) -> dict:
    """What the repository publishes and what is staged: roles, versions, expiries, thresholds, keys at hand,
    the model releases and how many boards each is granted to."""
    now = now or utcnow()
    root = repo.published("root").signed
    problems: list = []
    available = repo_keys.load_signers(repo.offline_keys, repo.online_keys, problems=problems)
    roles = {}
    for role in ("root", "targets", "snapshot", "timestamp"):
        md = repo.published(role).signed
        keyids = list(root.roles[role].keyids)
        roles[role] = {"version": md.version, "expires": md.expires.isoformat(), "expired": md.expires <= now,
                       "threshold": root.roles[role].threshold, "keyids": keyids,
                       "keys_here": sum(k in available for k in keyids)}
    published = repo.published("targets").signed.targets
    releases = []
    total = 0
    for path, info, custom in models(repo.current("targets").signed):
        rel = custom.get("release", "")
        try:
            granted = len([n for n in os.listdir(os.path.join(repo.grants_dir, rel)) if n.endswith(".age")])
        except OSError:
            granted = 0
        total += granted
        releases.append({"target": path, "name": custom.get("name"), "variant": custom.get("variant"),
                         "version": custom.get("version"), "release": rel, "hwclass": custom.get("hwclass"),
                         "ring": custom.get("ring"), "min_agent": custom.get("min_agent"), "length": info.length,
                         "published": path in published, "grants": granted})
    return {"path": repo.path, "consistent_snapshot": bool(root.consistent_snapshot), "roles": roles,
            "staged": repo.staged_roles(), "releases": releases, "grants": total, "key_problems": problems}
