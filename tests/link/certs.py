"""A throw-away PKI for the MQTT-link tests, built with ``cryptography``.

One trusted CA signs a server certificate for ``localhost``/``127.0.0.1`` and one client certificate per
identity (the identity is the certificate CN, which mosquitto turns into the MQTT username). A second,
*untrusted* CA with the same kind of certificates exists only so negative tests can present a
well-formed certificate the broker must refuse. Keys are EC P-256 (fast to generate) and written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, Sequence, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PathLike = Union[str, "os.PathLike[str]"]
CertPair = Tuple[pathlib.Path, pathlib.Path]

# Backdate so a board (or CI box) whose clock lags a little still accepts the certificates.
_BACKDATE = datetime.timedelta(days=1)
_LIFETIME = datetime.timedelta(days=30)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: pathlib.Path, data: bytes) -> None:
    # Create with 0600 from the start: a chmod after writing would leave a window with umask bits.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _write_cert(path: pathlib.Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates into one directory.

    Args:
        directory: Where the PEM files go (created if missing).
        common_name: The CA subject CN.
        stem: File name prefix for the CA's own files (``<stem>.pem``, ``<stem>.key``).
    """

    def __init__(self, directory: PathLike, common_name: str, *, stem: str = "ca") -> None:
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.common_name = common_name
        self._key = _new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.directory / f"{stem}.pem"
        self.key_path = self.directory / f"{stem}.key"
        _write_cert(self.cert_path, self.certificate)
        _write_key(self.key_path, self._key)

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        stem: str | None = None,
    ) -> CertPair:
        """Issues a leaf certificate and writes ``<stem>.pem`` and ``<stem>.key``.

        Args:
            common_name: Subject CN; for clients this is the identity mosquitto uses as username.
            server: Server certificate (serverAuth) instead of a client one (clientAuth).
            dns_names: SubjectAltName DNS entries.
            ip_addresses: SubjectAltName IP entries.
            stem: File name prefix; defaults to a file-safe form of ``common_name``.

        Returns:
            ``(cert_path, key_path)``.
        """
        key = _new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            # Python 3.13's default VERIFY_X509_STRICT rejects leaves without an AKI.
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = stem or _SAFE_NAME.sub("_", common_name)
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        _write_cert(cert_path, cert)
        _write_key(key_path, key)
        return cert_path, key_path


@dataclass
class Pki:
    """The trusted CA, the broker's server certificate, and client certificates by identity.

    Client certificates are issued on first request, so any identity works (``pki.client("dev-z")``).

    Attributes:
        directory: Root directory of all PEM files.
        ca: Trusted CA certificate (PEM path): the broker's ``cafile`` and the clients' ``ca_certs``.
        server_cert: Broker certificate for ``localhost`` and ``127.0.0.1``.
        server_key: Its key.
        authority: The trusted CA, to issue odd certificates in a test.
        untrusted: A second CA the broker does not know.
    """

    directory: pathlib.Path
    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    authority: CertificateAuthority
    untrusted: CertificateAuthority
    _clients: Dict[str, CertPair] = field(default_factory=dict, repr=False)
    _rogues: Dict[str, CertPair] = field(default_factory=dict, repr=False)

    def client(self, identity: str) -> CertPair:
        """Returns ``(cert, key)`` of a client certificate with CN ``identity``, signed by the trusted CA."""
        if identity not in self._clients:
            self._clients[identity] = self.authority.issue(identity, stem=f"client-{_file_stem(identity)}")
        return self._clients[identity]

    def untrusted_client(self, identity: str) -> CertPair:
        """Returns ``(cert, key)`` with CN ``identity`` signed by the untrusted CA (the broker must refuse it)."""
        if identity not in self._rogues:
            self._rogues[identity] = self.untrusted.issue(identity, stem=f"client-{_file_stem(identity)}")
        return self._rogues[identity]


def _file_stem(identity: str) -> str:
    return _SAFE_NAME.sub("_", identity)


def make_pki(directory: PathLike, clients: Iterable[str] = ("dev-a", "dev-b", "operator")) -> Pki:
    """Builds the test PKI in ``directory``.

    Args:
        directory: Empty or missing directory; ``trusted/`` and ``untrusted/`` are created below it.
        clients: Identities to issue client certificates for right away (others are issued on demand).

    Returns:
        The :class:`Pki`.
    """
    root = pathlib.Path(directory)
    authority = CertificateAuthority(root / "trusted", "fieldnode test CA")
    # Same CN as the trusted CA on purpose: the broker must check the signature, not the name.
    untrusted = CertificateAuthority(root / "untrusted", "fieldnode test CA")
    server_cert, server_key = authority.issue(
        "localhost", server=True, dns_names=["localhost"], ip_addresses=["127.0.0.1"], stem="server"
    )
    pki = Pki(
        directory=root,
        ca=authority.cert_path,
        server_cert=server_cert,
        server_key=server_key,
        authority=authority,
        untrusted=untrusted,
    )
    for identity in clients:
        pki.client(identity)
    return pki
