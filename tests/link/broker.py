"""A real mosquitto broker for the MQTT-link tests.

:class:`Broker` writes a mosquitto.conf into a temporary directory, runs ``mosquitto -c`` in its own process
group on a free loopback port and returns from :meth:`Broker.start` only once the listener answers an MQTT
CONNECT with a CONNACK (through TLS with a client certificate, in the TLS modes). Modes:

- ``plain``: anonymous, no TLS.
- ``tls``: client certificate required; its CN becomes the MQTT username (``use_identity_as_username``).
- ``acl``: ``tls`` plus an ACL file: each identity may only use ``fieldnode/v1/<its CN>/#``, and operators
  (by CN) may use all of ``fieldnode/v1/#``.

The broker log (``log_type all``) goes to a file that :meth:`Broker.log_text` returns for failure messages.
:meth:`Broker.restart` keeps the port, so clients reconnect to the same URL after an outage.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import weakref
from typing import Callable, Iterable, Optional, Sequence, Union

from tests.link.certs import Pki

MODES = ("plain", "tls", "acl")
TOPIC_ROOT = "fieldnode/v1"
MOSQUITTO_REMEDY = "install mosquitto: sudo apt-get install -y mosquitto (make test does it as root)"

PathLike = Union[str, "os.PathLike[str]"]

# Identity of the certificate the readiness probe presents; the ACL grants it nothing.
PROBE_IDENTITY = "broker-probe"
# MQTT 3.1.1 CONNECT (clean session, keepalive 10 s, client id = PROBE_IDENTITY) and its success CONNACK.
_PROBE_CONNECT = (
    bytes([0x10, 12 + len(PROBE_IDENTITY)])
    + b"\x00\x04MQTT\x04\x02\x00\x0a"
    + len(PROBE_IDENTITY).to_bytes(2, "big")
    + PROBE_IDENTITY.encode()
)
_CONNACK_ACCEPTED = b"\x20\x02\x00\x00"

_live: "weakref.WeakSet[Broker]" = weakref.WeakSet()


class BrokerError(RuntimeError):
    """The test broker could not be started or stopped."""


class BrokerNotFound(BrokerError):
    """No mosquitto executable on this machine."""


def find_mosquitto() -> str:
    """Returns the mosquitto executable (PATH first, then /usr/sbin, which is off a normal user's PATH).

    Raises:
        BrokerNotFound: mosquitto is not installed.
    """
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise BrokerNotFound(f"mosquitto not found; {MOSQUITTO_REMEDY}")
    return found


def free_port() -> int:
    """Returns a loopback TCP port that was free a moment ago (the caller retries on a collision)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_acl(operators: Iterable[str] = ("operator",)) -> str:
    """The ``acl`` mode ACL: devices confined to their prefix by certificate identity, operators everywhere.

    ``%u`` (the username, i.e. the certificate CN) rather than ``%c`` (the client id), because a client picks
    its own client id and could claim another device's.
    """
    lines = ["# Devices: only their own prefix, by certificate identity.", f"pattern readwrite {TOPIC_ROOT}/%u/#", ""]
    for name in operators:
        lines += [f"user {name}", f"topic readwrite {TOPIC_ROOT}/#", ""]
    return "\n".join(lines)


def _current_user() -> str:
    # mosquitto started as root drops to the 'mosquitto' user, which could not read our 0600 keys or write
    # the log; naming the invoking user keeps it as us (the option is ignored when not root).
    return pwd.getpwuid(os.geteuid()).pw_name


class Broker:
    """A mosquitto subprocess on 127.0.0.1.

    Args:
        workdir: Directory for the config, ACL and log (use ``tmp_path``).
        mode: ``"plain"``, ``"tls"`` or ``"acl"``.
        pki: Certificates; required for ``tls`` and ``acl``.
        port: Fixed port; by default a free one is picked (and re-picked on a collision).
        acl: ACL file text for ``acl`` mode; defaults to :func:`default_acl`.
        extra_config: More mosquitto.conf lines (global section, written before the listener).
        executable: mosquitto binary; defaults to :func:`find_mosquitto`.
        startup_timeout: Seconds to wait for the listener to come up.

    Raises:
        BrokerNotFound: mosquitto is not installed.
        ValueError: Unknown mode, or TLS without a PKI.
    """

    def __init__(
        self,
        workdir: PathLike,
        mode: str = "plain",
        *,
        pki: Optional[Pki] = None,
        port: Optional[int] = None,
        acl: Optional[str] = None,
        extra_config: Sequence[str] = (),
        executable: Optional[str] = None,
        startup_timeout: float = 15.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown broker mode {mode!r}; expected one of {MODES}")
        if mode != "plain" and pki is None:
            raise ValueError(f"broker mode {mode!r} needs a pki")
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.pki = pki
        self.host = "127.0.0.1"
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.acl = (acl if acl is not None else default_acl()) if mode == "acl" else None
        self.extra_config = list(extra_config)
        self.executable = executable or find_mosquitto()
        self.startup_timeout = startup_timeout
        self.conf_path = self.workdir / "mosquitto.conf"
        self.acl_path = self.workdir / "acl"
        self.log_path = self.workdir / "mosquitto.log"
        # mosquitto writes config errors to stderr before its log file is open.
        self.output_path = self.workdir / "mosquitto.out"
        self.starts = 0
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._lock = threading.Lock()

    # -- properties ---------------------------------------------------------------------------------------

    @property
    def tls(self) -> bool:
        """True when the listener speaks TLS (``tls`` and ``acl`` modes)."""
        return self.mode != "plain"

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` or ``mqtts://127.0.0.1:PORT``; stable across :meth:`restart`."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the mosquitto process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        """The mosquitto process id, or None when not started."""
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> "Broker":
        """Starts mosquitto and waits until the listener works.

        Returns:
            self, so ``broker = Broker(...).start()`` reads naturally.

        Raises:
            BrokerError: Already running, or it did not come up (the message carries the log).
        """
        with self._lock:
            if self.running:
                raise BrokerError(f"broker already running on {self.url}")
            attempts = 1 if self._fixed_port or self.starts else 5
            for attempt in range(attempts):
                if self._launch():
                    self.starts += 1
                    _live.add(self)
                    return self
                if not self._address_in_use() or attempt == attempts - 1:
                    break
                self.port = free_port()  # someone took our port between free_port() and bind
            raise BrokerError(f"mosquitto did not start on {self.url}\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto's clean shutdown) to the process group, then wait; SIGKILL if it hangs."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL, like a power cut: no DISCONNECT, no will suppression, nothing flushed."""
        self._terminate(signal.SIGKILL, 10.0)

    def restart(self) -> "Broker":
        """Stops (if running) and starts again on the same port, so the URL stays the same."""
        self.stop()
        return self.start()

    def __enter__(self) -> "Broker":
        return self.start() if not self.running else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- logs ---------------------------------------------------------------------------------------------

    def log_text(self) -> str:
        """The broker log of every start so far, plus anything mosquitto printed to stdout/stderr."""
        parts = []
        for path in (self.output_path, self.log_path):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            if text:
                parts.append(text)
        return "".join(parts)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of :meth:`log_text`, labelled, for assertion messages."""
        tail = self.log_text().splitlines()[-lines:]
        return f"--- mosquitto log ({self.url}) ---\n" + "\n".join(tail)

    def wait_for_log(self, needle: str, timeout: float = 10.0, *, count: int = 1) -> str:
        """Waits until ``needle`` occurs ``count`` times in the log (e.g. ``"Denied PUBLISH"``).

        Returns:
            The log text at that moment.

        Raises:
            AssertionError: It did not appear in time (the message carries the log tail).
        """
        def found() -> Optional[str]:
            text = self.log_text()
            return text if text.count(needle) >= count else None

        return _poll(found, timeout, lambda: f"{needle!r} x{count} not in broker log within {timeout}s\n"
                                             f"{self.log_tail()}")

    # -- internals ----------------------------------------------------------------------------------------

    def _config(self) -> str:
        lines = [
            "# Generated for one test; the broker lives in this directory.",
            f"user {_current_user()}",
            "per_listener_settings false",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type all",
            "log_timestamp true",
            "log_timestamp_format %H:%M:%S",
            "connection_messages true",
            *self.extra_config,
            "",
            f"listener {self.port} {self.host}",
        ]
        if self.mode == "plain":
            lines.append("allow_anonymous true")
        else:
            assert self.pki is not None
            lines += [
                f"cafile {self.pki.ca}",
                f"certfile {self.pki.server_cert}",
                f"keyfile {self.pki.server_key}",
                "require_certificate true",
                # The certificate CN becomes the username; a client-supplied username is ignored.
                "use_identity_as_username true",
                # Nobody gets in without a certificate that names them.
                "allow_anonymous false",
            ]
            if self.mode == "acl":
                lines.append(f"acl_file {self.acl_path}")
        return "\n".join(lines) + "\n"

    def _launch(self) -> bool:
        if self.acl is not None:
            self.acl_path.write_text(self.acl)
        self.conf_path.write_text(self._config())
        with open(self.output_path, "ab") as out:
            # Own session/process group: stop() can signal the whole group and nothing outlives the test.
            self._proc = subprocess.Popen(
                [self.executable, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ready = _poll(self._probe, self.startup_timeout, None)
        if not ready:
            self._terminate(signal.SIGKILL, 10.0)
        return bool(ready)

    def _probe(self) -> Optional[bool]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False  # died: stop polling
        try:
            with socket.create_connection((self.host, self.port), timeout=2.0) as raw:
                sock = self._probe_context().wrap_socket(raw, server_hostname=self.host) if self.tls else raw
                # A full MQTT handshake, not just TCP/TLS: under TLS 1.3 a refused client certificate shows
                # only after the handshake, and a CONNACK proves it is our mosquitto on this port.
                sock.sendall(_PROBE_CONNECT)
                connack = sock.recv(4)
                if connack != _CONNACK_ACCEPTED:
                    return None
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so the log says the probe left cleanly
        except (OSError, ssl.SSLError):
            return None  # not listening yet
        return True

    def _probe_context(self) -> ssl.SSLContext:
        assert self.pki is not None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.pki.ca))
        cert, key = self.pki.client(PROBE_IDENTITY)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def _address_in_use(self) -> bool:
        return "Address already in use" in self.log_text()

    def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        self._proc = None
        _live.discard(self)


def _poll(check: Callable[[], object], timeout: float, failure: Optional[Callable[[], str]]):
    """Calls ``check`` until it returns something other than None, or ``timeout`` passes.

    A return of False ends the wait early (as a failure). On timeout, raises AssertionError(failure()) if
    ``failure`` is given, else returns None.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            if failure is not None:
                raise AssertionError(failure())
            return None
        time.sleep(0.02)


@atexit.register
def _kill_leftovers() -> None:
    # Last line of defence (e.g. Ctrl-C during a fixture): never leave a broker behind.
    for broker in list(_live):
        broker.kill()

