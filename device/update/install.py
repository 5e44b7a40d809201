"""The install pipeline: from a verified repository to a new model on trial in the A/B store.

::

    inst = Installer.from_config(cfg)   # or Installer(repo, store, device_id=..., identities=..., facts=..., ...)
    inst.check()                         # what would be installed, and why newer releases are refused
    inst.install()                       # the pipeline below; the new model then serves on trial
    inst.status(); inst.rollback("reason")

**Which release.** A model *version* is every release (one per variant) of one name and version. The candidate
is the newest version of the model that serves now (the active slot's name, else the configured or bundled
model's) that is newer than what is installed, not below the store's floor, not failed before on this board,
with at least one variant that passes the target check. Variants that fail the target check (an Edge TPU
variant on a board without one) are left out of the install and listed as refused.

**Install, in this order** (each step an :class:`~device.update.errors.UpdateError` with its code)::

    metadata refresh (TUF)      metadata_signature_invalid, metadata_expired, rollback_refused, clock_behind ...
                                (device/update/client.py)
    target check                not_for_this_board
    defer check (unless force)  update_deferred, with the reason (power, thermal)
    store.begin                 rollback_refused (floor, failed version, an older version's plaintext), no_space,
                                update_busy: takes the store lock
    the board's grants          not_granted, decrypt_failed (before any download: no bytes for a board not granted)
    download + verify           download_failed, size_exceeded, hash_mismatch (resumable, into the store's downloads
                                directory)
    decrypt into the slot       hash_mismatch (plaintext against the signed facts), not_granted, decrypt_failed
    model.json                  built from the serving model's manifest (install_model.py)
    validate in a worker        validation_failed: test vectors (or a finite-output probe) for every variant
    store.activate(trial=True)  the atomic switch

A refused install touches nothing outside the store's staging area: the active model stays byte-identical.
Verified downloads are kept after a failure (a retry does not download them again) and removed after the switch;
downloads of other releases are removed when an install begins.

``progress(step, info)`` is called at each step boundary (:data:`STEPS`) and, during a download, with
``("download", {"variant", "file", "bytes", "total"})`` after each chunk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable

from device.clock import SYSTEM_CLOCK
from device.errors import ConfigError, FieldnodeError
from device.runtime.manifest import MANIFEST_NAME
from device.statefile import write_atomic
from device.update.errors import Deferred, StoreError, UpdateError, ValidationFailed
from device.update.install_model import build_manifest, manifest_bytes, model_file, validate, vectors_file
from device.update.install_plan import Candidate, Current, explicit, plan
from device.update.store.staging import os_error

log = logging.getLogger(__name__)

STEPS = ("refresh", "target", "defer", "begin", "grant", "download", "decrypt", "manifest", "validate", "activate",
         "done")
CHECK_FILE = "last-check.json"  # in the store's directory: what the last check found, for status
MAX_CHECK_BYTES = 256 * 1024


class Installer:
    """Checks for and installs model updates (see the module docstring).

    Args:
        repo: The board's :class:`~device.update.client.Repository`.
        store: The A/B :class:`~device.update.store.store.ModelStore`.
        device_id: This board's id (names its grants). identities: Its age identities (open its grants).
        facts: The board's :class:`~device.update.client.BoardFacts` (hardware class, rings, accelerators).
        runtime_settings: How this board runs models (validation runs the new model the same way).
        defer: Returns a reason to wait (the governor in its lowest levels, a low battery, a hot SoC) or None.
        progress: ``progress(step, info)``, see the module docstring.
        clock: Wall-clock time of the check results.
    """

    def __init__(self, repo, store, *, device_id: str, identities, facts, runtime_settings,
                 defer: Callable[[], str | None] | None = None,
                 progress: Callable[[str, dict], None] | None = None, clock=SYSTEM_CLOCK) -> None:
        self.repo, self.store = repo, store
        self.device_id, self.identities, self.facts = device_id, list(identities), facts
        self.runtime_settings = runtime_settings
        self.defer, self.progress, self.clock = defer, progress, clock
        self._last_check: dict | None = None

    @classmethod
    def from_config(cls, cfg, *, state_dir: str | None = None, store=None, who: str = "fieldnode update",
                    fetcher=None, source=None, facts=None, **kwargs) -> Installer:
        """The installer the configuration describes (``[update]``, ``[device]``, ``[runtime]``).

        Args:
            cfg: The loaded :class:`~device.config.Config`.
            state_dir: Instead of ``device.state_dir``; the store is ``<state_dir>/update``, the TUF metadata
                ``<state_dir>/update/metadata``.
            store: An existing store (the agent's own), instead of a new one.
            who: Names this process in the store lock.
            fetcher, source: Replace the transport (MQTT delivery), see :class:`~device.update.client.Repository`.
            facts: Instead of the facts read from the configuration and the hardware.
            kwargs: ``defer``, ``progress``, ``clock``.

        Raises:
            ConfigError: Updates are off, or the root or identity file cannot be read (naming the key).
        """
        from device import __version__
        from device import config as config_mod
        from device.runtime.runtime import RuntimeSettings
        from device.update import age
        from device.update.client import BoardFacts, Repository
        from device.update.store.store import ModelStore

        u = cfg.update
        if not u.root_file or not u.repository:
            raise ConfigError("updates are off: set update.root_file and update.repository", "update.root_file",
                              cfg.source)
        try:
            with open(u.root_file, "rb") as fh:
                root = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read the trusted root {u.root_file}: {exc.strerror or exc}",
                              "update.root_file", cfg.source) from exc
        try:
            identities = age.read_identity_file(u.identity_file)
        except UpdateError as exc:
            raise ConfigError(str(exc), "update.identity_file", cfg.source) from exc
        clock = kwargs.get("clock", SYSTEM_CLOCK)
        if store is None:
            store = ModelStore.for_state_dir(state_dir or cfg.device.state_dir, who=who, clock=clock)
        base = u.repository
        if "://" in base:
            def join(part):
                return base.rstrip("/") + "/" + part + "/"
            if base.split("://", 1)[0].lower() in ("http", "https"):
                from device.update.fetch import HttpFetcher, HttpSource

                http = HttpSource(timeout_s=u.timeout_s, credentials=_credentials(cfg))
                fetcher, source = fetcher or HttpFetcher(http), source or http
            elif base.split("://", 1)[0].lower() in ("mqtt", "mqtts"):
                from device.link.errors import BrokerUrlError
                from device.update.mqttfetch import MqttFetcher, MqttSource, transport_for

                try:
                    transport = transport_for(base, cfg)
                except BrokerUrlError as exc:
                    raise ConfigError(str(exc), "update.repository", cfg.source) from exc
                fetcher, source = fetcher or MqttFetcher(transport), source or MqttSource(transport)
        else:
            def join(part):
                return os.path.join(base, part)
        repo = Repository(os.path.join(store.root, "metadata"), root=root, metadata_url=join("metadata"),
                          targets_url=join("targets"), grants_url=join("grants"), fetcher=fetcher, source=source,
                          clock=clock)
        if facts is None:
            facts = BoardFacts(u.hwclass, rings=(u.ring,), accelerators=_accelerators(),
                               agent_version=__version__)
        return cls(repo, store, device_id=config_mod.device_id(cfg), identities=identities, facts=facts,
                   runtime_settings=RuntimeSettings.from_config(cfg.runtime), **kwargs)

    # --- what serves, what is there ---------------------------------------------------------------------

    def current(self) -> Current:
        """The model that serves now (the active slot, else the configured or bundled model).

        Raises:
            StoreError: Its manifest cannot be read (the next slot's manifest is built from it).
        """
        from device.runtime.manifest import bundled_model_dir, load_manifest

        active = self.store.active()
        path = active.dir if active is not None else (self.runtime_settings.model or bundled_model_dir())
        try:
            manifest = load_manifest(path)
        except FieldnodeError as exc:
            raise StoreError(f"the model that serves now cannot be read ({exc}); a new model's labels and input "
                             f"come from it") from exc
        if active is None:
            return Current(manifest.name, 0, "bundled", manifest)
        return Current(active.name, active.version, "store", manifest, active.slot, active.state)

    # --- check ------------------------------------------------------------------------------------------

    def check(self) -> dict:
        """Refreshes the metadata and says what :meth:`install` would install.

        Returns:
            ``{"checked_at", "model", "installed", "available": {name, version, variants, download_bytes,
            install_bytes} or None, "refused": [{version, variant, code, message}]}``.

        Raises:
            UpdateError: The refresh failed (its code), or the store cannot be read.
        """
        self._step("refresh")
        self.repo.refresh()
        cur = self.current()
        candidate, refused = plan(self.repo, self.store, self.facts, cur)
        result = {"checked_at": self.clock.time(), "model": cur.name, "installed": cur.as_json(),
                  "available": candidate.as_json() if candidate else None,
                  "refused": [r.as_json() for r in refused]}
        self._remember(result)
        return result

    # --- install ----------------------------------------------------------------------------------------

    def install(self, version: int | None = None, *, force: bool = False) -> dict:
        """Installs ``version`` (default: the newest one :meth:`check` finds) and switches to it on trial.

        Args:
            version: The release version to install; it may reinstall the committed version (not a lower one).
            force: Install even when ``defer`` says to wait.

        Returns:
            ``{"installed": True, "name", "version", "slot", "state", "variants", "checks", "previous"}``, or
            ``{"installed": False, "name", "reason": "up to date", ...}`` when nothing newer is there.

        Raises:
            UpdateError: The code of the step that refused (see the module docstring); nothing outside the
                staging area was touched.
        """
        self._step("refresh")
        self.repo.refresh()
        cur = self.current()
        self._step("target")
        if version is None:
            candidate, refused = plan(self.repo, self.store, self.facts, cur)
            if candidate is None:
                newer = [r for r in refused if r.malformed or (r.version is not None and r.version > cur.version)]
                if newer:
                    raise newer[0].error
                return {"installed": False, "name": cur.name, "reason": "up to date", "serving": cur.as_json()}
        else:
            candidate = explicit(self.repo, self.facts, cur, version)
        if not force and self.defer is not None:
            self._step("defer")
            reason = self.defer()
            if reason:
                raise Deferred(f"{candidate.name} v{candidate.version}: not now: {reason} (retried later; force "
                               f"installs now)")
        self._step("begin", name=candidate.name, version=candidate.version)
        plaintexts = {r.variant: r.plaintext_sha256 for r in candidate.releases}
        with self.store.begin(candidate.name, candidate.version, candidate.size_hint, plaintexts) as staging:
            try:
                checks, downloads = self._fill(staging, candidate, cur)
                self._step("activate")
                info = self.store.activate(staging, trial=True)
            except ValidationFailed as exc:  # this model does not pass on this board: never tried again
                staging.fail(f"{exc.code}: {exc}")
                raise
            except OSError as exc:
                raise os_error(exc, f"cannot install {candidate.name} v{candidate.version}", space=True) from exc
        for path in downloads:  # the switch is done: the ciphertexts served their purpose
            with contextlib.suppress(OSError):
                os.remove(path)
        self._step("done", name=info.name, version=info.version, slot=info.slot)
        return {"installed": True, "name": info.name, "version": info.version, "slot": info.slot,
                "state": info.state, "variants": [r.variant for r in candidate.releases], "checks": checks,
                "previous": cur.as_json()}

    def _fill(self, staging, cand: Candidate, cur: Current) -> tuple:
        """Grants, downloads, decrypts, writes model.json and validates, all inside ``staging``."""
        repo, name = self.repo, cand.name
        downloads_dir = self.store.downloads_dir
        arts = [(r, kind, art) for r in cand.releases
                for kind, art in (("model", r.model), ("test vectors", r.test_vectors)) if art is not None]
        _prune(downloads_dir, {a.target.hashes.get("sha256", "") for _, _, a in arts})
        keys = {}
        for r in cand.releases:  # before any download: a board not granted costs no bandwidth
            self._step("grant", variant=r.variant)
            keys[r.variant] = repo.fetch_release_key(r, self.device_id, self.identities)
        ciphers = {}
        for r, kind, art in arts:
            def report(done, total, variant=r.variant, kind=kind):
                self._step("download", variant=variant, file=kind, bytes=done, total=total)

            report(0, art.target.length)
            ciphers[art.path] = repo.download(art, downloads_dir, progress=report)
        shared = {r.test_vectors.plaintext_sha256 if r.test_vectors else None for r in cand.releases}
        shared_name = vectors_file(name) if len(shared) == 1 and None not in shared else None
        vectors = {}
        for r in cand.releases:
            self._step("decrypt", variant=r.variant)
            repo.decrypt_verified(ciphers[r.path], keys[r.variant], staging.path(model_file(name, r.variant)), r)
            vectors[r.variant] = None
            if r.test_vectors is not None:
                out = staging.path(shared_name or vectors_file(name, r.variant))
                if not os.path.exists(out):  # shared vectors: the same signed plaintext, decrypted once
                    repo.decrypt_verified(ciphers[r.test_vectors.path], keys[r.variant], out, r.test_vectors)
                vectors[r.variant] = out
        self._step("manifest")
        staging.write_file(MANIFEST_NAME, manifest_bytes(build_manifest(cur.manifest, name, cand.version,
                                                                        cand.releases, shared_name)))
        from device.runtime.manifest import load_manifest

        try:
            manifest = load_manifest(staging.dir)
        except FieldnodeError as exc:
            raise ValidationFailed(f"{name} v{cand.version}: {exc}") from exc
        self._step("validate")
        checks = validate(manifest, self.runtime_settings, vectors)
        return checks, list(ciphers.values())

    # --- status, rollback -------------------------------------------------------------------------------

    def close(self) -> None:
        """Releases what the delivery path holds (an MQTT transport's connection and thread)."""
        for part in (self.repo.fetcher, *self.repo._sources.values()):
            transport = getattr(part, "transport", None)
            if transport is not None:
                transport.close()

    def __enter__(self) -> "Installer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def status(self) -> dict:
        """See :func:`status` (with this installer's last check, if it made one)."""
        return status(self.store, self._last_check)

    def rollback(self, reason: str) -> dict:
        """See :func:`rollback`."""
        return rollback(self.store, reason)

    # --- internals --------------------------------------------------------------------------------------

    def _step(self, step: str, **info) -> None:
        if self.progress is not None:
            self.progress(step, info)

    def _remember(self, result: dict) -> None:
        self._last_check = result
        try:  # best effort: a check that cannot be recorded still answered
            write_atomic(os.path.join(self.store.root, CHECK_FILE), json.dumps(result).encode() + b"\n", mode=0o644)
        except OSError as exc:
            log.warning("cannot record the update check in %s: %s", self.store.root, exc.strerror or exc)


def status(store, last: dict | None = None) -> dict:
    """The store's status (:meth:`~device.update.store.store.ModelStore.status`) and the last check's result (``last``,
    else the one recorded in the store's directory, else None). Needs no repository: works with updates off."""
    out = store.status()
    out["last_check"] = last if last is not None else last_check(store)
    out["root_version"] = root_version(os.path.join(store.root, "metadata"))
    return out


def root_version(metadata_dir: str) -> int | None:
    """The version of the root this board trusts: the newest python-tuf kept after verifying it
    (``root_history/N.root.json``), or None before the first refresh. What the operator checks before deleting
    the retired keys of a rotation."""
    try:
        names = os.listdir(os.path.join(metadata_dir, "root_history"))
    except OSError:
        return None
    found = [int(n.split(".", 1)[0]) for n in names if n.endswith(".root.json") and n.split(".", 1)[0].isdigit()]
    return max(found, default=None)


def commit(store) -> dict:
    """Commits the model on trial, as the agent's health gate does when it passes: the floor rises to its version.

    Returns:
        ``{"committed": {slot, name, version, ...}, "floor"}``.

    Raises:
        StoreError: No model is on trial (nothing installed, or the one that serves is committed already).
        Busy: An install or the agent's own verdict holds the store lock.
    """
    active = store.active()
    if active is None or active.state != "trial":  # said before the lock, which would create the state directory
        what = f"{active.name} v{active.version} is committed" if active else "the bundled model serves"
        raise StoreError(f"no trial to commit: {what}")
    info = store.commit(active.version)
    return {"committed": info.as_json(), "floor": store.floor(info.name)}


def rollback(store, reason: str) -> dict:
    """Goes back to the previous model and marks the one that served as failed (never installed again).

    Returns:
        ``{"rolled_back": {"name", "version"}, "reason", "serving": slot or "bundled"}``.

    Raises:
        StoreError: Nothing is installed. Busy: An install or a trial judgement holds the store lock.
    """
    before = store.active()
    if before is None:  # said before the store takes its lock, which would create the state directory
        raise StoreError("nothing to roll back: the bundled model serves")
    now = store.rollback(reason)
    return {"rolled_back": {"name": before.name, "version": before.version},
            "reason": reason, "serving": now.as_json() if now is not None else "bundled"}


def last_check(store) -> dict | None:
    """What the last check on this board found (recorded in the store's directory), or None."""
    try:
        with open(os.path.join(store.root, CHECK_FILE), "rb") as fh:
            doc = json.loads(fh.read(MAX_CHECK_BYTES).decode())
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def _prune(directory: str, keep: set) -> None:
    """Removes downloads of other releases (``<sha256>`` and ``<sha256>.part`` files not in ``keep``)."""
    for n in os.listdir(directory):
        if n.split(".", 1)[0] not in keep:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, n))


def _credentials(cfg) -> str | None:
    """``update.credentials_file``'s ``USER:PASSWORD``, read as the link reads its password file, or None.

    Raises:
        ConfigError: The file cannot be read, or holds no ``USER:PASSWORD`` line (naming the key, never the file's
            content).
    """
    path = cfg.update.credentials_file
    if not path:
        return None
    from device.link.url import PasswordFileError, read_password

    try:
        text = read_password(path)
    except PasswordFileError as exc:
        raise ConfigError(f"the update credentials {path}: {exc.problem}", "update.credentials_file",
                          cfg.source) from exc
    user, sep, _ = text.partition(":")
    if not sep or not user or "\n" in text:
        raise ConfigError(f"{path}: expected one line USER:PASSWORD (HTTP Basic authentication)",
                          "update.credentials_file", cfg.source)
    return text


def _accelerators() -> tuple:
    """``("edgetpu",)`` when this board has an Edge TPU (a few sysfs reads; never raises)."""
    try:
        from drivers.accel import discover

        return ("edgetpu",) if discover().has_edgetpu else ()
    except Exception as exc:  # noqa: BLE001 (discovery is a courtesy: the target check then says "none")
        log.warning("accelerator discovery failed: %s", exc)
        return ()
