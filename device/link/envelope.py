"""Signed command envelopes (Ed25519). Broker ACLs are not enough: a compromised broker can publish anything.

1. ``fieldnode keys generate NAME`` makes a key pair; ``NAME.pub`` goes into each board's trust directory
   (/etc/fieldnode/trust), which :class:`TrustStore` loads.
2. The operator signs (:func:`sign_envelope`, ``fieldnode keys sign`` or any Ed25519 library) the canonical JSON
   (docs/signing.md) of command, args, target device, nonce, expiry and key id: no replay to another board or
   as another command.
3. The link hands each privileged payload to :meth:`Verifier.verify`: shape, target, key, signature, time
   window, nonce. Refusals are counted by code; nonces are kept (and persisted) until their envelope expires.

**Group envelopes.** An envelope's ``device`` may be ``group:<group>`` instead of a device id
(:func:`device.link.wire.group_target`). A board accepts it only when it arrived on that group's command topic
(``fieldnode/v1/group/<group>/cmd/<name>``) and the board is a member of the group now
(:class:`device.link.groups.Groups`); on its own topic, on another group's topic, or at a board that left the group
it is ``wrong_target``. Every member checks the same signature; the nonce is used up per board (each board's own
nonce store), so a member runs a group command once and a copy replayed to it later is ``replayed``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from device.clock import SYSTEM_CLOCK
from device.link.errors import (BadSignature, EnvelopeError, EnvelopeExpired, EnvelopeMalformed, EnvelopeReplayed,
                                EnvelopeTooLong, KeyFileError, UnknownKey, WrongTarget)
from device.link.keyfile import parse_key, read_key_file, key_id, load_private_key, load_public_key  # noqa: F401
from device.link import wire
from device.link.wire import canonical_json  # the wire contract's; importers may use this name too
from device.statefile import set_aside, write_atomic

log = logging.getLogger(__name__)

DEFAULT_TRUST_DIR = "/etc/fieldnode/trust"
SIGNED_FIELDS = ("args", "cmd", "device", "expires", "key", "nonce")
ENVELOPE_FIELDS = SIGNED_FIELDS + ("sig",)
UNSIGNED_FIELDS = ("request_id",)  # the link's de-duplication id: not part of the command, so never signed
NONCE_MIN_CHARS, NONCE_MAX_CHARS = 16, 128
REFUSAL_CODES = tuple(c.code for c in (EnvelopeMalformed, WrongTarget, UnknownKey, BadSignature,
                                       EnvelopeExpired, EnvelopeTooLong, EnvelopeReplayed))

# base64url or hex (a subset); anything else is refused, so nonces stay printable in logs and the nonce file.
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]+={0,2}\Z")
_NONCE_FILE_FORMAT = 1


def sign_envelope(private_key: ed25519.Ed25519PrivateKey, *, device: str, cmd: str, args: dict,
                  ttl_s: float = 60, clock=SYSTEM_CLOCK, nonce: str | None = None) -> dict:
    """Builds and signs a command envelope.

    Args:
        private_key: The operator's Ed25519 private key.
        device: The target device id, or ``group:<group>`` for a group command (:func:`device.link.wire.group_target`).
        cmd: The command name (as in the command topic).
        args: The command's arguments (a JSON object).
        ttl_s: Seconds until the envelope expires; ``expires`` is rounded up to whole Unix seconds.
        clock: Source of wall-clock time.
        nonce: The nonce; default 16 random bytes as base64url (22 characters).

    Returns:
        The envelope, exactly as a receiver will parse it (tuples become lists).

    Raises:
        EnvelopeMalformed: Empty device or cmd, args not a JSON object, ttl_s not a positive finite number, or
            a nonce of the wrong length or alphabet; the message names the argument.
        TypeError: ``private_key`` is not an Ed25519 private key.
    """
    if not isinstance(private_key, ed25519.Ed25519PrivateKey):
        raise TypeError(f"expected an Ed25519 private key, got {type(private_key).__name__}")
    for name, value in (("device", device), ("cmd", cmd)):
        if not isinstance(value, str) or not value:
            raise EnvelopeMalformed(f"'{name}': expected a non-empty string, got {_show(value)}")
    if not isinstance(args, dict):
        raise EnvelopeMalformed(f"'args': expected a JSON object (dict), got {_show(args)}")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0 or math.isinf(ttl_s):
        raise EnvelopeMalformed(f"'ttl_s': expected a positive number of seconds, got {_show(ttl_s)}")
    nonce = secrets.token_urlsafe(16) if nonce is None else nonce
    _check_nonce(nonce)
    unsigned = {"cmd": cmd, "args": args, "device": device, "nonce": nonce,
                "expires": math.ceil(clock.time() + ttl_s), "key": key_id(private_key)}
    message = _canonical_fields(unsigned, "")
    envelope = json.loads(message)  # so the caller's dict and the signed bytes cannot disagree
    envelope["sig"] = base64.b64encode(private_key.sign(message)).decode("ascii")
    return envelope


@dataclass(frozen=True)
class TrustKeys:
    """What one read of the trust directory found: ``{key id: (name, public key)}`` and the files it skipped."""

    keys: dict[str, tuple[str, ed25519.Ed25519PublicKey]]
    problems: tuple[str, ...]


class TrustStore:
    """The operator public keys a board trusts: every ``*.pub`` file of the trust directory.

    A bad file does not stop the others: it is skipped, listed in :attr:`problems` (file and reason) for status
    and diag, and logged once. A key file or directory that every user may write is refused (anyone could plant
    a key). A reload asked for by an operator (SIGHUP, :meth:`read` with ``strict``) is refused instead when a
    key file or the directory cannot be read (a permission or I/O error): dropping a key because of a read
    error would make its signed commands fail ``unknown_key`` while the reload said it succeeded.

    Args:
        directory: The trust directory; the agent passes it from its config.
    """

    def __init__(self, directory: str = DEFAULT_TRUST_DIR) -> None:
        self.directory = os.fspath(directory)
        self._keys: dict[str, tuple[str, ed25519.Ed25519PublicKey]] = {}
        self._problems: list[str] = []
        self._logged: set[str] = set()
        self.reload()

    @property
    def keys(self) -> dict[str, tuple[str, ed25519.Ed25519PublicKey]]:
        """``{key id: (name, public key)}``; the name is the file name without ``.pub``."""
        return dict(self._keys)

    @property
    def problems(self) -> list[str]:
        """What the last load skipped: one line per file or directory problem."""
        return list(self._problems)

    def get(self, kid: str) -> tuple[str, ed25519.Ed25519PublicKey] | None:
        """``(name, public key)`` of key ``kid``, or None when it is not trusted."""
        return self._keys.get(kid)

    def reload(self) -> None:
        """Reads the trust directory again; the new key set replaces the old one in one step."""
        self.use(self.read())

    def read(self, *, strict: bool = False) -> "TrustKeys":
        """Reads the trust directory without changing the keys in force (:meth:`use` puts them in force).

        Args:
            strict: Raise instead of skipping when the directory or a key file cannot be read.

        Raises:
            KeyFileError: With ``strict``, the directory or a key file cannot be read (naming it and why).
        """
        keys: dict[str, tuple[str, ed25519.Ed25519PublicKey]] = {}
        problems: list[str] = []
        d = self.directory
        try:
            mode = os.stat(d).st_mode
            names = sorted(os.listdir(d))
        except OSError as exc:
            if strict:
                raise KeyFileError(f"trust directory {d}: cannot list it ({_short(exc)}); the keys in force are "
                                   f"kept") from exc
            problems.append(f"trust directory {d}: cannot list it ({_short(exc)}); no command keys are trusted")
            names = []
        else:
            if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                problems.append(f"trust directory {d} is writable by every user (mode {stat.S_IMODE(mode):04o}); "
                                f"no command keys are trusted until it is fixed (chmod o-w)")
                names = []
        for name in names:
            if name.startswith(".") or not name.endswith(".pub"):
                continue
            path = os.path.join(d, name)
            try:
                pub = parse_key(read_key_file(path, trusted=True), path, private=False)
            except KeyFileError as exc:
                if strict and isinstance(exc.__cause__, OSError):  # unreadable, not a bad key: do not drop it
                    raise KeyFileError(f"{exc}; the keys in force are kept") from exc.__cause__
                problems.append(f"{exc}; skipped")
                continue
            kid = key_id(pub)
            if kid in keys:
                problems.append(f"key file {path}: duplicate of key {kid} from {keys[kid][0]}.pub; skipped")
                continue
            keys[kid] = (name[:-len(".pub")], pub)
        return TrustKeys(keys, tuple(problems))

    def use(self, loaded: "TrustKeys") -> None:
        """Puts keys read by :meth:`read` in force, in one step; logs each new problem once."""
        keys, problems = dict(loaded.keys), list(loaded.problems)
        self._keys, self._problems = keys, problems  # one assignment each: readers never see a half-loaded set
        for p in problems:
            if p not in self._logged:
                self._logged.add(p)
                log.warning("trust: %s", p)
        log.info("trust: %d command key(s) loaded from %s", len(keys), self.directory)


@dataclass(frozen=True)
class VerifiedCommand:
    """A command whose envelope passed every check."""

    cmd: str
    args: dict
    key_id: str
    key_name: str
    nonce: str
    expires: float


class Verifier:
    """Checks envelopes against the trust store, this device, the clock and the nonce cache.

    The signature is checked before the time window and the nonce, so only a trusted key's envelopes ever
    reach the nonce cache, whose size is therefore bounded by ``max_ttl_s`` times the signed command rate.

    Args:
        trust: The trusted keys.
        device_id: This board's id; envelopes for another device are refused.
        clock: Wall-clock source (``clock.time()``); ``expires`` is in Unix seconds.
        max_ttl_s: How far ahead ``expires`` may be; this is how long a nonce is kept at most.
        skew_s: Clock difference tolerated between signer and board, in both directions.
        nonce_path: File that keeps the nonce cache across restarts; None keeps it in memory only.
        groups: The board's groups (anything with ``in``, e.g. :class:`device.link.groups.Groups`); None: none.
    """

    def __init__(self, trust: TrustStore, *, device_id: str, clock=SYSTEM_CLOCK, max_ttl_s: float = 600,
                 skew_s: float = 30, nonce_path: str | None = None, groups=None) -> None:
        if not device_id or not max_ttl_s > 0 or not skew_s >= 0:
            raise ValueError(f"need a device_id, max_ttl_s > 0, skew_s >= 0: {device_id!r}, {max_ttl_s}, {skew_s}")
        self.trust = trust
        self.device_id = device_id
        self.groups = groups if groups is not None else ()
        self.max_ttl_s = max_ttl_s
        self.skew_s = skew_s
        self.nonce_path = os.fspath(nonce_path) if nonce_path is not None else None
        self._clock = clock
        self._nonces: dict[tuple[str, str], float] = {}
        self._claimed: dict[tuple[str, str], float] = {}  # nonces let into the link's signed lane (claim())
        self._counters = {"accepted": 0, **{f"refused_{c}": 0 for c in REFUSAL_CODES}}
        self._load_problems: list[str] = []
        self._write_problem: str | None = None
        self._lock = threading.Lock()
        if self.nonce_path is not None:
            self._load_nonces()

    @property
    def counters(self) -> dict[str, int]:
        """``accepted`` and ``refused_<code>`` for every refusal code, zeros included."""
        return dict(self._counters)

    @property
    def problems(self) -> list[str]:
        """Nonce-file problems: moved aside as corrupt, unreadable, or not writable right now."""
        return self._load_problems + ([self._write_problem] if self._write_problem else [])

    @property
    def pending_nonces(self) -> int:
        """How many (key id, nonce) pairs are remembered."""
        return len(self._nonces)

    def verify(self, envelope: Any, cmd: str, group: str | None = None) -> VerifiedCommand:
        """Verifies one envelope that arrived as command ``cmd``; on success its nonce is used up.

        Args:
            envelope: The parsed JSON payload.
            cmd: The command the payload arrived for (from the topic).
            group: The group whose command topic it arrived on, or None for the board's own topic.

        Returns:
            The verified command.

        Raises:
            EnvelopeMalformed: Not a dict, a missing or unknown field, or a field of the wrong type or size.
            WrongTarget: Signed for another device, or for another command; bound to a group but not on that group's
                topic or at a board outside it; bound to this board but on a group's topic.
            UnknownKey: The key id is not in the trust store.
            BadSignature: The signature does not verify over the canonical envelope.
            EnvelopeExpired: ``expires`` is more than ``skew_s`` in the past.
            EnvelopeTooLong: ``expires`` is more than ``max_ttl_s + skew_s`` ahead.
            EnvelopeReplayed: The key already used this nonce in an envelope that has not expired.
        """
        with self._lock:  # check-and-insert is atomic, so two copies of one envelope cannot both pass
            try:
                result = self._verify(envelope, cmd, group)
            except EnvelopeError as exc:
                self._counters[f"refused_{exc.code}"] = self._counters.get(f"refused_{exc.code}", 0) + 1
                raise
            self._counters["accepted"] += 1
            return result

    def claim(self, envelope: Any, cmd: str, group: str | None = None) -> bool:
        """Whether ``envelope`` would pass :meth:`verify` now, and no copy of it was claimed before; nothing is
        used up or written (the link sorts its intake with it, on its network thread).

        Every check of :meth:`verify` but the recording of the nonce; the nonce is remembered as claimed until
        the envelope expires, so replayed copies are not authentic here a second time.
        """
        try:
            fields, expires, sig, message = _check_shape(envelope)
        except EnvelopeError:
            return False
        now = self._clock.time()
        if (self._target_problem(fields["device"], group) is not None or fields["cmd"] != cmd
                or expires < now - self.skew_s or expires > now + self.max_ttl_s + self.skew_s):
            return False
        key = (fields["key"], fields["nonce"])
        entry = self.trust.get(fields["key"])
        with self._lock:
            if entry is None or key in self._nonces or key in self._claimed:
                return False
        try:
            entry[1].verify(sig, message)
        except InvalidSignature:
            return False
        with self._lock:
            if key in self._claimed:
                return False
            for k in [k for k, exp in self._claimed.items() if exp < now - self.skew_s]:
                del self._claimed[k]
            self._claimed[key] = expires
        return True

    def _target_problem(self, target: str, group: str | None) -> str | None:
        """Why an envelope for ``target`` that arrived on ``group``'s topic (None: the board's own) is not for this
        board there, or None."""
        if group is None:
            if target == self.device_id:
                return None
            if target.startswith(wire.GROUP_TARGET_PREFIX):
                return (f"envelope is bound to {_show(target)}: a group envelope is accepted only on that group's "
                        f"topic, not on this board's own")
            return f"envelope is for device {_show(target)}, this is {self.device_id!r}"
        if target != wire.group_target(group):
            return (f"envelope is for {_show(target)} but arrived on the topic of group {group!r} (a group command "
                    f"needs an envelope bound to {wire.group_target(group)!r})")
        if group not in self.groups:
            return f"this board ({self.device_id}) is not a member of group {group!r}"
        return None

    def _verify(self, envelope: Any, cmd: str, group: str | None = None) -> VerifiedCommand:
        now = self._clock.time()
        self._prune(now)
        fields, expires, sig, message = _check_shape(envelope)
        target_problem = self._target_problem(fields["device"], group)
        if target_problem is not None:
            raise WrongTarget(target_problem)
        if fields["cmd"] != cmd:
            raise WrongTarget(f"envelope is for command {_show(fields['cmd'])} but arrived as {cmd!r}")
        kid, nonce = fields["key"], fields["nonce"]
        entry = self.trust.get(kid)
        if entry is None:
            raise UnknownKey(f"key {_show(kid)} is not in the trust directory {self.trust.directory}")
        name, public_key = entry
        try:
            public_key.verify(sig, message)
        except InvalidSignature as exc:
            raise BadSignature(f"signature does not verify with key {kid} ({name}) over the canonical envelope") \
                from exc
        if expires < now - self.skew_s:
            raise EnvelopeExpired(f"envelope expired {now - expires:.0f} s ago (clock skew allowed {self.skew_s} s)")
        if expires > now + self.max_ttl_s + self.skew_s:
            raise EnvelopeTooLong(f"envelope expires {expires - now:.0f} s from now; at most {self.max_ttl_s} s "
                                  f"(+{self.skew_s} s skew) is accepted")
        if (kid, nonce) in self._nonces:
            raise EnvelopeReplayed(f"nonce {nonce} of key {kid} ({name}) was already used")
        self._nonces[(kid, nonce)] = expires
        self._save_nonces()
        return VerifiedCommand(cmd=fields["cmd"], args=fields["args"], key_id=kid, key_name=name, nonce=nonce,
                               expires=expires)

    def _prune(self, now: float) -> None:
        # Keep a nonce exactly as long as its envelope could still pass the expiry check.
        for k in [k for k, exp in self._nonces.items() if exp < now - self.skew_s]:
            del self._nonces[k]

    def _save_nonces(self) -> None:
        if self.nonce_path is None:
            return
        doc = {"format": _NONCE_FILE_FORMAT, "nonces": [[k, n, e] for (k, n), e in sorted(self._nonces.items())]}
        try:
            write_atomic(self.nonce_path, json.dumps(doc, separators=(",", ":")).encode("utf-8"))
        except OSError as exc:
            # Accept anyway: the nonce is in memory, so replays are refused until the agent restarts, while
            # refusing every command on a full disk would lock operators out of the fix. Logged once.
            if self._write_problem is None:
                log.warning("envelope: nonce file %s: cannot write it (%s)", self.nonce_path, _short(exc))
            self._write_problem = (f"nonce file {self.nonce_path}: cannot write it ({_short(exc)}); a replay "
                                   f"right after an agent restart would not be detected")
        else:
            self._write_problem = None

    def _load_nonces(self) -> None:
        path = self.nonce_path
        try:
            with open(path, "rb") as fh:
                entries = _parse_nonce_file(fh.read())
        except FileNotFoundError:
            return
        except OSError as exc:
            self._load_problem(f"nonce file {path}: cannot read it ({_short(exc)}); starting with no nonces")
            return
        except ValueError as exc:
            moved = set_aside(path, self._clock.time())
            self._load_problem(f"nonce file {path}: corrupt ({exc}); {moved}; starting with no nonces")
            return
        self._nonces = {(k, n): e for k, n, e in entries}
        self._prune(self._clock.time())

    def _load_problem(self, message: str) -> None:
        self._load_problems.append(message)
        log.warning("envelope: %s", message)


def _parse_nonce_file(raw: bytes) -> list[tuple[str, str, float]]:
    """Entries of a nonce file; ValueError (with the reason) for anything this module did not write."""
    doc = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(doc, dict) or doc.get("format") != _NONCE_FILE_FORMAT or not isinstance(doc.get("nonces"), list):
        raise ValueError(f"expected an object with format {_NONCE_FILE_FORMAT} and a 'nonces' list")
    for i, e in enumerate(doc["nonces"]):
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str)
                and type(e[2]) in (int, float) and math.isfinite(e[2])):
            raise ValueError(f"nonces[{i}] is not [key id, nonce, expires]")
    return [(k, n, float(e)) for k, n, e in doc["nonces"]]


def _check_shape(env: Any) -> tuple[dict, float, bytes, bytes]:
    """(signed fields, expires, signature, canonical bytes) of a well-formed envelope; else EnvelopeMalformed."""
    if not isinstance(env, dict):
        raise EnvelopeMalformed(f"envelope: expected a JSON object, got {type(env).__name__}")
    missing = [f for f in ENVELOPE_FIELDS if f not in env]
    if missing:
        raise EnvelopeMalformed(f"envelope: missing field(s) {', '.join(missing)}")
    extra = sorted(str(k) for k in env if k not in ENVELOPE_FIELDS and k not in UNSIGNED_FIELDS)
    if extra:
        raise EnvelopeMalformed(f"envelope: unknown field(s) {', '.join(_show(k) for k in extra[:5])}; "
                                f"allowed: {', '.join(ENVELOPE_FIELDS + UNSIGNED_FIELDS)}")
    for f in ("cmd", "device", "key", "nonce", "sig"):
        if not isinstance(env[f], str) or not env[f]:
            raise EnvelopeMalformed(f"envelope field '{f}': expected a non-empty string, got {_show(env[f])}")
    if not isinstance(env["args"], dict):
        raise EnvelopeMalformed(f"envelope field 'args': expected a JSON object, got {_show(env['args'])}")
    exp = env["expires"]
    # A huge JSON integer is finite but would overflow float arithmetic later: refuse it here too.
    if type(exp) not in (int, float) or abs(exp) > 1e15 or not math.isfinite(exp):
        raise EnvelopeMalformed(f"envelope field 'expires': expected a finite number (Unix seconds), got {_show(exp)}")
    _check_nonce(env["nonce"], "envelope field ")
    try:
        sig = base64.b64decode(env["sig"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeMalformed(f"envelope field 'sig': not valid base64 ({_short(exc)})") from exc
    if len(sig) != 64:
        raise EnvelopeMalformed(f"envelope field 'sig': expected 64 bytes (Ed25519), got {len(sig)}")
    fields = {f: env[f] for f in SIGNED_FIELDS}
    return fields, float(exp), sig, _canonical_fields(fields, "envelope field ")


def _canonical_fields(fields: dict, prefix: str) -> bytes:
    """canonical_json(fields), naming the field that cannot be serialized (args, or a lone surrogate)."""
    for f in sorted(fields):  # a few small fields: serializing twice costs less than one signature check
        try:
            canonical_json(fields[f])
        except EnvelopeMalformed as exc:
            raise EnvelopeMalformed(f"{prefix}'{f}': {exc}") from exc.__cause__
    return canonical_json(fields)


def _check_nonce(nonce: Any, prefix: str = "") -> None:
    if not isinstance(nonce, str) or not NONCE_MIN_CHARS <= len(nonce) <= NONCE_MAX_CHARS:
        got = f"{len(nonce)} characters" if isinstance(nonce, str) else _show(nonce)
        raise EnvelopeMalformed(f"{prefix}'nonce': expected {NONCE_MIN_CHARS}..{NONCE_MAX_CHARS} characters, got {got}")
    if not _NONCE_RE.match(nonce):
        raise EnvelopeMalformed(f"{prefix}'nonce': expected base64url or hex characters, got {_show(nonce)}")


def _show(value: Any) -> str:
    """A value for an error message: its type and a bounded repr (envelopes come from the network)."""
    r = repr(value)
    r = r if len(r) <= 40 else r[:37] + "..."
    return r if isinstance(value, str) else f"{type(value).__name__} {r}"


def _short(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).split(". See https://", 1)[0]  # cryptography appends an FAQ link
    return text if len(text) <= 120 else text[:117] + "..."
