"""``fieldnode provision --renew``: a certificate renewed, the board's identity kept.

A client certificate expires; the board's TLS key and its update identity need not change with it. Renewal reads
the existing TLS key (``link.key_file``, or where provision put it), and hands the fleet CA a certificate request
for it: the existing one (``client.csr``) when it still matches that key and the device id, else a new one made
from the same key. Nothing else is written: not the key, not the age identity (releases granted to the board's
recipient keep opening), not the config. Re-keying stays ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Callable

from device.errors import Exit, FieldnodeError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


class RenewError(FieldnodeError):
    """The certificate cannot be renewed: the key cannot be read, the request cannot be written."""

    code = "renew_failed"


class NothingToRenew(RenewError):
    """``--renew`` on a board that has no TLS key yet."""

    code = "keys_missing"


def renew(args: argparse.Namespace, root: str, config_path: str, text: str, *, make_plan: Callable,
          make_csr: Callable[[PrivateKeyTypes, str], bytes]) -> int:
    """Renews the certificate request of the board (or the image under ``root``) from its existing key.

    Args:
        args: The parsed ``provision`` arguments (``device_id`` optional, ``json``).
        root: ``/`` on the board, or the image root.
        config_path: The config file as the board names it.
        text: Its text.
        make_plan: :func:`tools.provision.make_plan` (where provision put each file).
        make_csr: :func:`tools.provision.make_csr`. Both are passed in: that module calls this one.

    Returns:
        :attr:`Exit.OK` once the request is ready.

    Raises:
        UsageError: No device id to renew for, or another id than the config's.
        NothingToRenew: There is no TLS key to renew from.
        RenewError: The key cannot be read, or the request cannot be written.
        ConfigError: The config is invalid.
    """
    from device import config
    from device.statefile import short_error, write_atomic

    source = config_path if root == "/" else os.path.join(root, config_path.lstrip("/"))
    cfg = config.loads(text, source=source)
    device_id = args.device_id or cfg.device.id
    if not device_id:
        raise UsageError(f"--renew: {source} has no device.id; provision the board first "
                         f"(fieldnode provision --device-id ID)")
    if cfg.device.id and device_id != cfg.device.id:
        raise UsageError(f"--renew keeps the board's id {cfg.device.id}; another id is another identity: "
                         f"fieldnode provision --device-id {device_id} --force")
    plan, _new_text = make_plan(device_id, root, config_path, text)  # the same paths provision chose
    key_path, csr_path = plan.host(plan.key), plan.host(plan.csr)
    if root != "/":  # an absolute symlink in the image points at this machine's files
        real = os.path.realpath(csr_path)
        if os.path.commonpath([real, os.path.realpath(root)]) != os.path.realpath(root):
            raise RenewError(f"certificate request {csr_path} resolves to {real}, outside the image root {root}; "
                             f"refusing to write to this machine's files")
    key = _read_key(key_path, plan.key)
    reused = _matching_request(csr_path, key, device_id)
    csr = reused
    if csr is None:
        csr = make_csr(key, device_id)
        try:
            os.makedirs(os.path.dirname(csr_path), mode=0o755, exist_ok=True)
            write_atomic(csr_path, csr, 0o644)
        except OSError as exc:
            raise RenewError(f"cannot write {csr_path}: {short_error(exc)}; nothing was changed") from exc
    doc = {"ok": True, "renewed": True, "device_id": device_id, "csr": csr.decode("ascii"), "root": root,
           "csr_reused": reused is not None, "recipient": _recipient(plan.host(plan.identity)),
           "files": {"config": plan.config, "identity": plan.identity, "key": plan.key, "csr": plan.csr,
                     "certificate": plan.cert}, "warnings": []}
    if args.json:
        print(json.dumps(doc))
        return Exit.OK
    how = "the existing request, which matches the key" if reused is not None else "a new request"
    print("\n".join([
        f"device id: {device_id}",
        f"certificate request: {plan.csr} ({how}, for the existing TLS key {plan.key})",
        f"kept: the TLS key {plan.key}, the update identity {plan.identity}, the config {plan.config}",
        "next:",
        f"  1. sign the request with the fleet CA; install the certificate at {plan.cert} (mode 0644)",
        "  2. sudo systemctl restart fieldnode, then fieldnode diag",
        csr.decode("ascii").rstrip("\n"),
    ]))
    return Exit.OK


def _read_key(path: str, board_path: str) -> PrivateKeyTypes:
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise NothingToRenew(f"no TLS key at {board_path} to renew a certificate for: provision the board first "
                             f"(fieldnode provision --device-id ID)") from None
    except OSError as exc:
        raise RenewError(f"cannot read the TLS key {board_path}: {exc.strerror or exc} (run it as root)") from exc
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise RenewError(f"the TLS key {board_path} is not an unencrypted PEM key ({exc}); re-key the board "
                             f"with --force") from exc


def _matching_request(path: str, key: PrivateKeyTypes, device_id: str) -> bytes | None:
    """The request at ``path`` when it is for ``key`` and names ``device_id``, else None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    try:
        with open(path, "rb") as fh:
            data = fh.read()
        csr = x509.load_pem_x509_csr(data)
    except (OSError, ValueError):
        return None
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if csr.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki) or not csr.is_signature_valid \
            or not cn or cn[0].value != device_id:
        return None
    return data


def _recipient(identity_path: str) -> str | None:
    """The age recipient named in the identity file's ``# public key:`` line (unchanged by a renewal)."""
    try:
        with open(identity_path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("# public key: "):
                    return line.split(": ", 1)[1].strip()
    except OSError:
        pass
    return None

