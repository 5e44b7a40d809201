"""The board's view of an update repository: from a trusted root and a location to a verified, decrypted model.

One :class:`Repository` per check or install, in this order::

    repo = Repository(metadata_dir, root=root_bytes, metadata_url=..., targets_url=..., grants_url=...)
    repo.refresh()                         # TUF: root walk, timestamp, snapshot, targets (python-tuf's ngclient)
    for release in repo.releases():        # the model targets of the verified targets metadata, facts parsed
        repo.check_target(release, board)  # hardware class, ring, minimum agent version, accelerator
    key = repo.fetch_release_key(release, device_id, identities)   # the board's grant, opened
    cipher = repo.download(release, staging_dir)                   # resumable, capped, verified ciphertext
    repo.decrypt_verified(cipher, key, out_path, release)          # plaintext checked against the signed facts

What each step trusts:

* The **root** comes from the board's configuration (``bootstrap``), never from the repository on trust; newer
  roots are accepted only through TUF's chain, and python-tuf keeps what it verified in ``metadata_dir``
  between runs (rollback protection lives there).
* The **facts** (:mod:`device.update.layout`) are read from python-tuf's verified targets, never from a file.
* A **grant** (the release key, encrypted to this board) is outside TUF: it needs confidentiality, not
  integrity. A forged, swapped or replayed grant can only open to a key that does not decrypt the
  TUF-verified ciphertext, which is refused as ``not_granted``; whatever a grant holds, the plaintext must
  still match the signed sha256 and length.
* The **clock**: a board without a real-time clock refuses to judge expiry while its clock reads earlier than
  its last successful refresh (``clock_behind``, :class:`~device.update.client_tuf.NotBefore`), and python-tuf
  judges expiry at this clock's time.

Delivery paths: ``file://`` URLs (a USB stick: :class:`~device.update.fetch.DirectoryFetcher` and
:class:`~device.update.fetch.DirectorySource`) and ``http(s)://`` (python-tuf's ``Urllib3Fetcher`` and
:class:`~device.update.fetch.HttpSource`); ``fetcher=`` (a python-tuf fetcher) and ``source=`` (a
:class:`~device.update.fetch.RangeSource`) replace them, which is how MQTT delivery plugs in.

Every failure is an :class:`~device.update.errors.UpdateError` with its code; python-tuf's exceptions are mapped
in :func:`~device.update.client_tuf.map_tuf_error`.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import logging
import os
import pathlib
import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from tuf.api.exceptions import DownloadHTTPError

from device import __version__
from device.clock import SYSTEM_CLOCK, backoff_delay
from device.statefile import AtomicFile, fsync_dir
from device.update import age, layout
from device.update.client_tuf import NotBefore, RoleTracking, map_tuf_error, trusted_set, updater
from device.update.errors import (DecryptError, DownloadError, HashMismatch, MetadataError, NoSpace, NotGranted,
                                  SizeError, StoreError, TargetRefused, UpdateError)
from device.update.fetch import (DirectoryFetcher, DirectorySource, HttpSource, download_target, local_path,
                                 target_url)

log = logging.getLogger(__name__)

MAX_GRANT_BYTES = 64 * 1024  # a grant holds one identity (~300 bytes); anything bigger is not one
MAX_GRANT_PLAINTEXT = 1024
STATE_NAME = "not-before.json"


@dataclass(frozen=True)
class BoardFacts:
    """What the board says about itself, checked against a release's signed facts.

    Attributes:
        hwclass: The board's hardware class (provisioned).
        rings: The rollout rings it accepts.
        accelerators: The accelerators it has (``("edgetpu",)`` or empty).
        agent_version: The running agent's version.
    """

    hwclass: str
    rings: tuple = (layout.DEFAULT_RING,)
    accelerators: tuple = ()
    agent_version: str = __version__


@dataclass(frozen=True)
class Artifact:
    """One encrypted file of a release: its TUF target and the plaintext it must decrypt to.

    Attributes:
        path: The target path. target: python-tuf's verified ``TargetFile`` (ciphertext length and hashes).
        plaintext_sha256: The signed plaintext sha256 (hex). plaintext_length: The signed plaintext length.
    """

    path: str
    target: object = field(repr=False, hash=False)
    plaintext_sha256: str
    plaintext_length: int


@dataclass(frozen=True)
class Release:
    """A model release listed in the verified targets metadata, with its signed facts.

    Attributes:
        path: The model's target path. name, variant, version: Which release. release_id: Names its grants.
        target: The ciphertext's verified ``TargetFile``.
        plaintext_sha256, plaintext_length: What the model decrypts to.
        hwclass: Hardware classes that may install it (empty: any). ring: Its rollout ring.
        min_agent: The lowest agent version, or None. requires: The accelerator it needs, or None.
        test_vectors: Its encrypted test vectors (same release key), or None.
    """

    path: str
    name: str
    variant: str
    version: int
    release_id: str
    target: object = field(repr=False, hash=False)
    plaintext_sha256: str
    plaintext_length: int
    hwclass: tuple
    ring: str
    min_agent: str | None
    requires: str | None
    test_vectors: Artifact | None

    @property
    def model(self) -> Artifact:
        """The model file as an :class:`Artifact`."""
        return Artifact(self.path, self.target, self.plaintext_sha256, self.plaintext_length)


def _location(url: str, what: str) -> tuple:
    """``("file", file URL)`` or ``("http", url)``; a plain path is a directory."""
    if "://" not in url:
        return "file", pathlib.Path(os.path.abspath(url)).as_uri()
    scheme = url.split("://", 1)[0].lower()
    if scheme == "file":
        return "file", url
    if scheme in ("http", "https"):
        return "http", url
    if scheme in ("mqtt", "mqtts"):
        return "mqtt", url
    raise DownloadError(f"{what} {url!r}: expected a file://, http(s):// or mqtt(s):// URL")


def _base(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _repository_dir(url: str) -> str | None:
    """The repository directory a ``file://`` URL of one of its parts (``BASE/metadata/``) lies in: every file read
    must be a regular file under it, reached without following a link (the configured ``BASE`` itself may be
    one)."""
    try:
        return os.path.dirname(local_path(url).rstrip("/")) or "/"
    except DownloadHTTPError:  # a file URL of another host: refused when it is read
        return None


class Repository:
    """One update repository as the board sees it (see the module docstring for the workflow).

    Args:
        metadata_dir: Where python-tuf keeps the metadata it trusts between runs (created when missing).
        root: The trusted root metadata (bytes of ``1.root.json`` or a later one) from the configuration.
        metadata_url, targets_url, grants_url: Where the metadata, the targets and the grants are:
            ``file://`` (or a plain directory) or ``http(s)://``.
        fetcher: A python-tuf fetcher for metadata, instead of the one ``metadata_url`` selects.
        source: A :class:`~device.update.fetch.RangeSource` for targets and grants, instead of the URLs' own.
        clock: Wall-clock time (the clock guard, expiry) and the sleeps between attempts.
        state_path: The "not before" state file (default ``metadata_dir/not-before.json``).
        attempts: Transport failures in a row before a download gives up. backoff: ``(min, max)`` seconds
            between attempts. rng: The randomness of the backoff jitter.
    """

    def __init__(self, metadata_dir: str, *, root: bytes, metadata_url: str, targets_url: str, grants_url: str,
                 fetcher=None, source=None, clock=SYSTEM_CLOCK, state_path: str | None = None, attempts: int = 5,
                 backoff: tuple = (0.5, 30.0), rng: random.Random | None = None) -> None:
        if not isinstance(root, (bytes, bytearray)) or not root:
            raise MetadataError("the trusted root from the configuration is empty or not bytes")
        self.metadata_dir = metadata_dir
        self.root = bytes(root)
        kind, self.metadata_url = _location(metadata_url, "metadata_url")
        if kind == "mqtt" and (fetcher is None or source is None):
            raise DownloadError("an mqtt:// repository needs the MQTT fetcher and source (device.update.mqttfetch)")
        if fetcher is None and kind == "file":
            fetcher = DirectoryFetcher(root=_repository_dir(self.metadata_url))
        self.fetcher = fetcher
        self.targets_url = _base(_location(targets_url, "targets_url")[1])
        self.grants_url = _base(_location(grants_url, "grants_url")[1])
        self._sources = {"targets": source, "grants": source}
        for which, url in (("targets", self.targets_url), ("grants", self.grants_url)):
            if source is None and _location(url, which)[0] == "file":
                self._sources[which] = DirectorySource(root=_repository_dir(url))
        self.clock = clock
        self.not_before = NotBefore(state_path or os.path.join(metadata_dir, STATE_NAME))
        self.attempts = attempts
        self.backoff = backoff
        self.rng = rng or random.Random()
        self.refused: list = []  # MetadataError of each malformed model target seen by releases()
        self.refused_paths: list = []  # and its target path
        self._updater = None

    # -- metadata ----------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Checks the clock, then runs TUF's client workflow (root walk, timestamp, snapshot, targets).

        Raises:
            ClockError: The clock reads earlier than the last successful refresh.
            SignatureError, ThresholdError, RollbackError, ExpiredError, HashMismatch, SizeError, MetadataError,
            DownloadError, StoreError, NoSpace: as mapped from python-tuf (the message names the role).
        """
        from tuf.ngclient import Urllib3Fetcher

        self._updater = None
        now = self.clock.time()
        self.not_before.check(now)
        try:
            os.makedirs(self.metadata_dir, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.metadata_dir}: cannot create the metadata directory "
                             f"({exc.strerror or exc})") from exc
        tracking = RoleTracking(self.fetcher if self.fetcher is not None else Urllib3Fetcher())
        try:
            tuf = updater(self.metadata_dir, _base(self.metadata_url), tracking, self.root)
        except UpdateError:
            raise
        except Exception as exc:  # the configured root itself: malformed, or not signed by its own keys
            err = map_tuf_error(exc, "root")
            raise type(err)(f"the trusted root from the configuration: {err}") from exc
        # Expiry is judged at this clock's time, the one the guard just accepted.
        trusted_set(tuf).reference_time = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        try:
            tuf.refresh()
        except UpdateError:
            raise
        except Exception as exc:
            raise map_tuf_error(exc, tracking.role()) from exc
        finally:  # each file is durable already; this keeps the root.json link python-tuf remakes
            fsync_dir(self.metadata_dir)
        self._updater = tuf
        self.not_before.advance(now)

    def _trusted(self):
        if self._updater is None:
            self.refresh()
        return trusted_set(self._updater)

    def releases(self) -> list:
        """Every model release in the verified top-level targets, sorted by path (refreshes first if needed).

        A model target whose signed facts are malformed is left out, logged, and kept in :attr:`refused`: one
        bad entry must not stop the others from installing.

        Returns:
            ``[Release]``.
        """
        targets = self._trusted().targets
        out, self.refused, self.refused_paths = [], [], []
        for path, info in sorted(targets.targets.items()):
            custom = info.unrecognized_fields.get("custom")
            if not (isinstance(custom, Mapping) and custom.get("kind") == "model") and \
                    not path.endswith(".tflite.age"):
                continue
            try:
                out.append(self._release(path, info, targets))
            except MetadataError as exc:
                log.warning("model target refused: %s", exc)
                self.refused.append(exc)
                self.refused_paths.append(path)
        return out

    def release(self, path: str) -> Release:
        """The release at ``path``.

        Raises:
            MetadataError: No such target in the verified targets, or its facts are malformed (names the field).
        """
        targets = self._trusted().targets
        info = targets.targets.get(path)
        if info is None:
            raise MetadataError(f"target {path}: not listed in the signed targets metadata")
        return self._release(path, info, targets)

    @staticmethod
    def _release(path: str, info, targets) -> Release:
        facts = layout.parse_model_facts(path, info.unrecognized_fields.get("custom"))
        vectors = None
        if facts.test_vectors is not None:
            vinfo = targets.targets.get(facts.test_vectors.path)
            if vinfo is None:
                raise MetadataError(f"target {path}: signed custom.test_vectors.target {facts.test_vectors.path} is "
                                    f"not listed in the signed targets metadata")
            vectors = Artifact(facts.test_vectors.path, vinfo, facts.test_vectors.sha256, facts.test_vectors.length)
        return Release(path=path, name=facts.name, variant=facts.variant, version=facts.version,
                       release_id=facts.release, target=info, plaintext_sha256=facts.plaintext.sha256,
                       plaintext_length=facts.plaintext.length, hwclass=facts.hwclass, ring=facts.ring,
                       min_agent=facts.min_agent, requires=facts.requires, test_vectors=vectors)

    @staticmethod
    def check_target(release: Release, facts: BoardFacts) -> None:
        """Refuses a release that is not for this board.

        Raises:
            TargetRefused: Names the fact that fails: hardware class, ring, minimum agent version, accelerator.
        """
        where = f"{release.path} (release {release.release_id})"
        if release.hwclass and facts.hwclass not in release.hwclass:
            raise TargetRefused(f"{where}: hardware class: it is for {', '.join(release.hwclass)}; this board is "
                                f"{facts.hwclass!r}")
        if release.ring not in facts.rings:
            raise TargetRefused(f"{where}: ring: it is in ring {release.ring!r}; this board accepts "
                                f"{', '.join(facts.rings) or 'no ring'}")
        if release.min_agent is not None:
            try:
                have = layout.parse_version(facts.agent_version)
            except ValueError as exc:
                raise TargetRefused(f"{where}: minimum agent version: the board's version cannot be compared "
                                    f"({exc})") from exc
            if have < layout.parse_version(release.min_agent):
                raise TargetRefused(f"{where}: minimum agent version: it needs agent {release.min_agent} or later; "
                                    f"this board runs {facts.agent_version}")
        if release.requires is not None and release.requires not in facts.accelerators:
            raise TargetRefused(f"{where}: accelerator: variant {release.variant!r} needs an {release.requires}; "
                                f"this board has {', '.join(facts.accelerators) or 'none'}")

    # -- bytes ------------------------------------------------------------------------------------------------

    def _source(self, which: str):
        if self._sources[which] is None:
            self._sources[which] = HttpSource()
        return self._sources[which]

    def fetch_release_key(self, release: Release, device_id: str, identities: Sequence) -> str:
        """Downloads this board's grant for ``release`` and opens it with the board's own identities.

        Args:
            release: The release. device_id: This board's id (the grant's name is derived from it).
            identities: The board's age identities (``AGE-SECRET-KEY-1...``).

        Returns:
            The release identity (``AGE-SECRET-KEY-1...``), checked to be one.

        Raises:
            NotGranted: No grant for this board, or one that is not for this board's identities.
            SizeError: The grant is larger than :data:`MAX_GRANT_BYTES`.
            DecryptError: The grant is malformed, tampered with, or does not hold an identity.
            DownloadError: It could not be fetched after ``attempts`` tries.
        """
        url = self.grants_url + layout.grant_name(release.release_id, device_id)
        data = self._read_small(url, release)
        what = f"key file {url}"
        try:
            plain = age.decrypt_bytes(data, list(identities), max_plaintext=MAX_GRANT_PLAINTEXT)
        except age.NoMatchingIdentity as exc:
            raise NotGranted(f"release {release.release_id}: the key file is not for this board (device "
                             f"{device_id}): {what} ({exc})") from exc
        except SizeError as exc:
            raise DecryptError(f"{what}: holds more than a release key ({exc})") from exc
        except DecryptError as exc:
            raise DecryptError(f"{what}: {exc}") from exc
        try:
            identity = plain.decode("ascii").strip()
            age.parse_identity(identity)
        except (UnicodeDecodeError, DecryptError) as exc:
            raise DecryptError(f"{what}: opens, but does not hold an age identity") from exc
        return identity

    def _read_small(self, url: str, release: Release) -> bytes:
        """The whole grant at ``url``, read through the grants source, with retries."""
        source = self._source("grants")
        failures = 0
        while True:
            buf = bytearray()
            try:
                for chunk in source.read(url, 0):
                    buf += chunk
                    if len(buf) > MAX_GRANT_BYTES:
                        raise SizeError(f"key file {url}: larger than {MAX_GRANT_BYTES} bytes; a key file holds "
                                        f"one release key")
                return bytes(buf)
            except DownloadHTTPError as exc:
                if exc.status_code in (403, 404):
                    raise NotGranted(f"release {release.release_id}: no release key for this board at {url} "
                                     f"(grant it: fieldnode repo grant)") from exc
                problem = str(exc)
            except UpdateError:
                raise
            except Exception as exc:  # a dropped connection, a pulled stick
                problem = f"{type(exc).__name__}: {exc}"
            failures += 1
            if failures >= self.attempts:
                raise DownloadError(f"key file {url}: {problem} ({failures} attempts)")
            self.clock.sleep(backoff_delay(failures - 1, self.backoff[0], self.backoff[1], self.rng))

    def download(self, item, staging_dir: str, progress: Callable[[int, int], None] | None = None) -> str:
        """Downloads a release's model (or an :class:`Artifact`, such as its test vectors) into ``staging_dir``.

        Resumable, capped at the signed length and verified against the signed hash (see
        :func:`~device.update.fetch.download_target`).

        Returns:
            The path of the verified ciphertext.

        Raises:
            SizeError, HashMismatch, DownloadError: as :func:`~device.update.fetch.download_target`.
        """
        art = item.model if isinstance(item, Release) else item
        consistent = bool(self._trusted().root.consistent_snapshot)
        url = target_url(self.targets_url, art.path, art.target.hashes.get("sha256", ""), consistent)
        try:
            return download_target(art.target, url, self._source("targets"), staging_dir, attempts=self.attempts,
                                   backoff=self.backoff, clock=self.clock, progress=progress, rng=self.rng)
        except SizeError as exc:  # the fetch layer's message does not name the target
            raise SizeError(f"{art.path}: {exc}") from exc

    @staticmethod
    def decrypt_verified(cipher_path: str, release_identity: str, out_path: str, facts) -> None:
        """See :func:`decrypt_verified`."""
        decrypt_verified(cipher_path, release_identity, out_path, facts)


def _disk_error(what: str, exc: OSError) -> UpdateError:
    cls = NoSpace if exc.errno == errno.ENOSPC else StoreError
    return cls(f"{what}: {exc.strerror or exc}")


def decrypt_verified(cipher_path: str, release_identity: str, out_path: str, facts) -> None:
    """Decrypts a verified ciphertext into ``out_path``, streaming, and checks the plaintext against the signed
    facts before it takes that name.

    The plaintext goes to a temporary file beside ``out_path`` (hashed as each authenticated chunk passes, capped
    at the signed length), which is fsynced, renamed to ``out_path`` only when its sha256 and length are the
    signed ones, and the directory fsynced. On any failure the temporary file is removed and ``out_path`` is
    untouched.

    Args:
        cipher_path: The ciphertext, as :meth:`Repository.download` returned it.
        release_identity: The release key, as :meth:`Repository.fetch_release_key` returned it.
        out_path: Where the plaintext goes.
        facts: A :class:`Release` or :class:`Artifact` (``path``, ``plaintext_sha256``, ``plaintext_length``).

    Raises:
        NotGranted: The release key does not open this ciphertext (a grant swapped with another board's,
            replayed from another release, or forged).
        DecryptError: The ciphertext is malformed or was altered after it was verified.
        HashMismatch: The plaintext is not the signed one (length or sha256).
        NoSpace, StoreError: ``out_path``'s directory cannot be written.
    """
    directory = os.path.dirname(os.path.abspath(out_path))
    name = facts.path
    try:
        af = AtomicFile(out_path, 0o600)  # a plaintext model is what the encryption protects: the owner's only
    except OSError as exc:
        raise _disk_error(f"{directory}: cannot write the decrypted {name}", exc) from exc
    try:
        _decrypt_into(af, cipher_path, release_identity, out_path, facts)
    except OSError as exc:  # the fsync or the rename of the commit
        raise _disk_error(f"{name}: cannot write {out_path}", exc) from exc


def _decrypt_into(af: AtomicFile, cipher_path: str, release_identity: str, out_path: str, facts) -> None:
    name = facts.path
    with af:
        digest = hashlib.sha256()
        try:
            with open(cipher_path, "rb") as src:
                length = age.decrypt(src, af.file, [release_identity], max_plaintext=facts.plaintext_length,
                                     on_chunk=digest.update)
        except age.NoMatchingIdentity as exc:
            raise NotGranted(f"{name}: the release key from this board's key file does not open it (a key file "
                             f"of another release or another board, or a forged one)") from exc
        except SizeError as exc:
            raise HashMismatch(f"{name}: the plaintext is longer than the signed {facts.plaintext_length} "
                               f"bytes") from exc
        except DecryptError as exc:
            raise DecryptError(f"{name}: {exc}") from exc
        except OSError as exc:
            raise _disk_error(f"{name}: cannot decrypt {cipher_path} into {out_path}", exc) from exc
        if length != facts.plaintext_length or digest.hexdigest() != facts.plaintext_sha256:
            raise HashMismatch(f"{name}: the plaintext ({length} bytes, sha256 {digest.hexdigest()[:16]}...) is "
                               f"not the signed one ({facts.plaintext_length} bytes, sha256 "
                               f"{facts.plaintext_sha256[:16]}...)")
