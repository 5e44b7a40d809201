"""Broker URLs and TLS files, shared by the agent's link and by ``fieldnode send``.

A broker is named by ``mqtt://HOST[:PORT]`` (plain, default port 1883) or ``mqtts://HOST[:PORT]`` (TLS,
default port 8883); IPv6 literals go in brackets. Nothing else is accepted: no path, query or fragment, and
never credentials, which belong in files with tight permissions, not in URLs that end up in shell history,
logs and process lists.

1. :func:`parse_broker_url` turns the text into a :class:`BrokerUrl` (or a :class:`BrokerUrlError` that says
   what is wrong and shows the expected form).
2. :func:`check_tls` checks that the :class:`TlsFiles` fit the URL and can be read, before any connection
   (:func:`tls_problem` says the same and which file is at fault, for callers that name the file their way).
3. :func:`apply_tls` hands them to a paho client, turning ``ssl`` errors into :class:`BrokerUrlError`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass

from device.link.errors import BrokerUrlError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
EXPECTED_FORM = "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (default ports 1883 and 8883, IPv6 as [ADDR])"

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")  # ASCII digits only: int() would also take '١٨٨٣'
_HEAD_BYTES = 64 * 1024  # enough to see a PEM label; a CA bundle may be longer, but its start tells the kind


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker URL.

    Attributes:
        scheme: ``"mqtt"`` or ``"mqtts"``.
        host: Host name (lower case), IPv4 address, or IPv6 address without brackets.
        port: TCP port, 1-65535.
    """

    scheme: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if self.scheme not in DEFAULT_PORTS:
            raise BrokerUrlError(f"broker URL scheme {self.scheme!r}: {EXPECTED_FORM}")
        if not isinstance(self.host, str) or not self.host:
            raise BrokerUrlError(f"broker URL host {self.host!r}: expected a non-empty host name or address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise BrokerUrlError(f"broker URL port {self.port!r}: expected a number from 1 to 65535")

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        host = self.host
        if ":" in host:  # IPv6; a zone id is written %25 inside a URL (RFC 6874)
            host = "[" + host.replace("%", "%25", 1) + "]"
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class TlsFiles:
    """TLS files for an ``mqtts://`` broker; empty strings (or None) mean "not given"; paths may be PathLike.

    Attributes:
        ca: CA certificate(s) the broker's certificate must chain to (PEM).
        cert: Client certificate (PEM), the operator's or device's identity.
        key: The client certificate's private key (PEM, unencrypted).
    """

    ca: str = ""
    cert: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        # Callers pass config strings, pathlib paths or None; keep one form so messages and checks agree.
        for name in ("ca", "cert", "key"):
            object.__setattr__(self, name, os.fspath(getattr(self, name) or ""))

    def given(self) -> bool:
        """True when any file is set."""
        return bool(self.ca or self.cert or self.key)


def parse_broker_url(url: str) -> BrokerUrl:
    """Parses ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``.

    Args:
        url: The URL text. Scheme and host name are case-insensitive.

    Returns:
        The :class:`BrokerUrl`, with the default port filled in.

    Raises:
        BrokerUrlError: Another scheme, credentials, a path, query or fragment, an empty or malformed host,
            or a port that is not a number from 1 to 65535. The message shows the URL (credentials masked)
            and the expected form.
    """
    if not isinstance(url, str):
        raise BrokerUrlError(f"broker URL: expected a string, got {type(url).__name__}; {EXPECTED_FORM}")

    def bad(problem: str) -> BrokerUrlError:
        return BrokerUrlError(f"broker URL {_mask(url)!r}: {problem}; {EXPECTED_FORM}")

    if "@" in url:
        raise bad("credentials (user:password@) do not belong in a URL; give a username and a password "
                  "file separately")
    if any(not c.isprintable() or c.isspace() for c in url):
        raise bad("contains whitespace or control characters")
    m = _SCHEME_RE.match(url)
    if m is None:
        raise bad("no scheme")
    scheme = m.group(1).lower()
    if scheme not in DEFAULT_PORTS:
        raise bad(f"unsupported scheme {scheme!r}")
    rest = url[m.end():]
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if tail:
        what = {"/": "a path", "?": "a query", "#": "a fragment"}[tail[0]]
        raise bad(f"{what} ({tail!r}) is not allowed")
    host, port_text = _split_host_port(authority, bad)
    if port_text is None:
        port = DEFAULT_PORTS[scheme]
    elif not port_text:
        raise bad("empty port after ':'")
    elif not _PORT_RE.match(port_text):
        raise bad(f"port {port_text!r} is not a number")
    else:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise bad(f"port {port} is out of range 1-65535")
    return BrokerUrl(scheme, host, port)


def check_tls(url: BrokerUrl | str, tls: TlsFiles) -> None:
    """Checks that the TLS files fit the URL and can be read, so mistakes show before connecting.

    Args:
        url: The broker URL (parsed, or text to parse).
        tls: The files given.

    Raises:
        BrokerUrlError: The URL is malformed, or :func:`tls_problem` found a problem (its message).
    """
    found = tls_problem(url, tls)
    if found is not None:
        raise BrokerUrlError(found[1])


def tls_problem(url: BrokerUrl | str, tls: TlsFiles, *, read_files: bool = True) -> tuple[str, str] | None:
    """What is wrong with the TLS files for this URL, and which one is at fault.

    The messages name files by their role (CA file, client certificate, client key), never by the option or
    key a caller reads them from: the caller reports the role under its own name (``--ca``, ``link.ca_file``).

    Args:
        url: The broker URL (parsed, or text to parse).
        tls: The files given.
        read_files: Also open each file (missing, unreadable, not a regular file, an encrypted key); without it
            only the rules between the URL and the files given are checked, which every tool may ask.

    Returns:
        None when they fit, else ``(role, message)``; role ``"ca"``, ``"cert"`` or ``"key"`` names the file at
        fault, ``"url"`` the URL itself (TLS files given for a plain ``mqtt://`` URL). Problems: ``mqtts://``
        without a CA file; a file that is missing, unreadable or not a regular file; a certificate without its
        key or a key without its certificate; an encrypted key; any TLS file for a plain ``mqtt://`` URL.

    Raises:
        BrokerUrlError: ``url`` is text that is not a valid broker URL.
    """
    if isinstance(url, str):
        url = parse_broker_url(url)
    if not url.tls:
        if tls.given():
            names = ", ".join(f"{k} {v}" for k, v in (("CA", tls.ca), ("cert", tls.cert), ("key", tls.key)) if v)
            return "url", (f"TLS files given for a plain mqtt:// URL ({url}): {names}; use mqtts:// for TLS, or "
                           f"drop the files")
        return None
    if not tls.ca:
        return "ca", (f"{url} uses TLS but no CA file is given (the CA certificate that signed the broker's "
                      f"certificate)")
    if bool(tls.cert) != bool(tls.key):
        role, given, missing = ("key", "certificate", "key") if tls.cert else ("cert", "key", "certificate")
        return role, (f"client {given} {tls.cert or tls.key} given without its {missing}; give the client "
                      f"certificate and its key, or neither")
    for role, path, what in (("ca", tls.ca, "CA file"), ("cert", tls.cert, "client certificate"),
                             ("key", tls.key, "client key")):
        if not path or not read_files:
            continue
        try:
            head = _read_head(path, what)
        except BrokerUrlError as exc:
            return role, str(exc)
        if role == "key" and b"ENCRYPTED" in head:  # PKCS8 "ENCRYPTED PRIVATE KEY" or "Proc-Type: 4,ENCRYPTED"
            return role, (f"client key {tls.key} is encrypted; an unattended client cannot type its passphrase: "
                          f"use an unencrypted key file readable only by its user")
    return None


def apply_tls(client, tls: TlsFiles) -> None:
    """Configures TLS on a paho client (``tls_set``) with the given files.

    Args:
        client: A ``paho.mqtt.client.Client`` on which TLS is not configured yet.
        tls: The files; an empty ``ca`` means the system's CAs, empty ``cert``/``key`` no client certificate.

    Raises:
        BrokerUrlError: A file cannot be read or parsed, the key does not match the certificate, the key is
            encrypted, or TLS was already configured; names the file(s).
    """
    import ssl  # here, not at the top: the config imports this module, and an agent with no link needs no TLS

    try:
        # A password callback that refuses: without it OpenSSL would prompt on the terminal for an encrypted
        # key and hang an unattended agent.
        client.tls_set(ca_certs=tls.ca or None, certfile=tls.cert or None, keyfile=tls.key or None,
                       keyfile_password=_refuse_password(tls.key or tls.cert))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise BrokerUrlError(f"TLS setup failed: {_diagnose(tls, exc)}") from exc


def _split_host_port(authority: str, bad) -> tuple[str, str | None]:
    """(canonical host, port text or None) of ``host[:port]`` or ``[v6][:port]``."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise bad("'[' without a closing ']'")
        literal, after = authority[1:end], authority[end + 1:]
        if after and not after.startswith(":"):
            raise bad(f"unexpected {after!r} after the IPv6 address")
        return _ipv6(literal, bad), (after[1:] if after else None)
    host, sep, port_text = authority.rpartition(":")
    if not sep:
        host, port_text = authority, None
    if ":" in host:
        raise bad("an IPv6 address must be written in brackets, e.g. mqtt://[::1]:1883")
    if not host:
        raise bad("empty host")
    return _hostname(host, bad), port_text


def _ipv6(literal: str, bad) -> str:
    address, pct, zone = literal.partition("%")
    if pct:
        zone = zone[2:] if zone.startswith("25") else zone  # RFC 6874 writes the '%' itself as %25
        if not zone:
            raise bad("empty IPv6 zone id")
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError as exc:
        raise bad(f"{literal!r} is not an IPv6 address") from exc
    return f"{parsed.compressed}%{zone}" if pct else parsed.compressed


def _hostname(host: str, bad) -> str:
    if re.fullmatch(r"[0-9.]+", host):  # all digits and dots: only an IPv4 address makes sense
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError as exc:
            raise bad(f"{host!r} is not an IPv4 address") from exc
    name = host.lower()
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")  # one trailing dot: an FQDN
    if len(name) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise bad(f"host {host!r} is not a valid host name (letters, digits, '-', '_' in dot-separated labels)")
    return name


def _mask(url: str) -> str:
    # Error messages end up in logs and terminals: never repeat a password someone put in the URL. Everything
    # up to the last '@' goes, since a password may itself contain '/', '?' or '@'.
    if "@" not in url:
        return url
    scheme, sep, _ = url.partition("://")
    return (scheme + sep if sep and _SCHEME_RE.match(scheme + sep) else "") + "***@" + url.rpartition("@")[2]


def file_problem(path: str, what: str) -> str | None:
    """Why the regular file at ``path`` cannot be read (``"<what> <path>: ..."``), or None; a FIFO given by
    mistake fails the check instead of hanging it."""
    try:
        _read_head(path, what)
    except BrokerUrlError as exc:
        return str(exc)
    return None


def _read_head(path: str, what: str) -> bytes:
    """The first bytes of a regular file, or BrokerUrlError naming it."""
    try:
        # O_NONBLOCK: a FIFO given by mistake must fail the regular-file check, not hang the open.
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise BrokerUrlError(f"{what} {path}: not a regular file")
            return fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise BrokerUrlError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from exc


def _refuse_password(path: str):
    def refuse() -> bytes:
        raise BrokerUrlError(f"client key {path} is encrypted; use an unencrypted key file readable only by "
                             f"its user")
    return refuse


def _diagnose(tls: TlsFiles, exc: BaseException) -> str:
    """Which file made ``tls_set`` fail, found by loading each in turn (only on the error path)."""
    import ssl

    reason = _ssl_reason(exc)
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return f"client key {tls.key} does not match client certificate {tls.cert}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.cert:
        try:
            ctx.load_cert_chain(tls.cert, tls.key or None, _refuse_password(tls.key or tls.cert))
        except (ssl.SSLError, OSError, ValueError) as e:
            return f"client certificate {tls.cert} / key {tls.key}: {_ssl_reason(e)}"
    if tls.ca:
        try:
            ctx.load_verify_locations(tls.ca)
        except (ssl.SSLError, OSError, ValueError) as e:
            return f"CA file {tls.ca}: {_ssl_reason(e)}"
    names = ", ".join(f"{k}={v}" for k, v in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)) if v)
    return f"{reason} ({names or 'system CAs'})"


def _ssl_reason(exc: BaseException) -> str:
    import ssl

    if isinstance(exc, ssl.SSLError) and exc.reason:
        hints = {"NO_CERTIFICATE_OR_CRL_FOUND": "no PEM certificate in it"}
        return hints.get(exc.reason, exc.reason)
    if isinstance(exc, ssl.SSLError) and "PEM lib" in str(exc):
        return "not a PEM certificate or key (or the key is in the certificate's place)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# -- the password file: read one way by every MQTT client (the link, update delivery, send, diag) ----------------

MAX_PASSWORD_BYTES = 4096  # far above any real password; a larger file is the wrong file


class PasswordFileError(BrokerUrlError):
    """A password file cannot be read, is not a regular file, is not UTF-8 or is too large.

    Attributes:
        path: The file.
        problem: What is wrong with it, without the file's name in front (callers name it their way).
    """

    code = "password_file_invalid"

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"password file {path}: {problem}")


def read_password(path: str | os.PathLike) -> str:
    """The password a file holds.

    Args:
        path: The password file.

    Returns:
        Its text without one trailing ``"\\n"`` or ``"\\r\\n"``; anything else (spaces, a second newline) is part
        of the password.

    Raises:
        PasswordFileError: Missing, unreadable, not a regular file (a FIFO fails instead of hanging), larger than
            :data:`MAX_PASSWORD_BYTES`, or not UTF-8.
    """
    path = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO given by mistake must fail the regular-file check, not hang the open.
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise PasswordFileError(path, "not a regular file")
            data = fh.read(MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise PasswordFileError(path, f"cannot read it ({exc.strerror or exc})") from exc
    if len(data) > MAX_PASSWORD_BYTES:
        raise PasswordFileError(path, f"larger than {MAX_PASSWORD_BYTES} bytes; it must hold the password only")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PasswordFileError(path, f"not UTF-8 text (byte {exc.start} cannot be decoded)") from exc
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")
