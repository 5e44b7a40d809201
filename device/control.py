"""The agent's local control socket: ``fieldnode status`` (and ``diag``) reach the running agent here, with no broker.

A Unix stream socket in the runtime directory (``device.runtime_dir``, systemd's ``RuntimeDirectory``), mode 0660
and group ``fieldnode``: the agent's user and the technicians in that group may talk to it, nobody else. The
protocol is one JSON object per line each way, several requests per connection (``fieldnode status --watch``
keeps one open)::

    -> {"op": "status", "args": {}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": {"code": "unknown_command", "message": "..."}}

The result is encoded as the MQTT replies are (:func:`device.link.wire.encode`), so the ``status`` command over
MQTT and this socket answer from one source with one encoding. Error codes are the MQTT commands' where the
meaning is the same (``bad_json``, ``bad_request``, ``payload_too_large``, ``unknown_command``, ``internal``).

The agent serves its command registry here (:mod:`device.agent.controlserver`), the same one as over MQTT, but
only the commands marked local: unprivileged and read-only (``status``, ``ping``, ``update.status``,
``config.get``). A privileged command is an unknown op here: it needs a signed envelope over MQTT.

Bounded like the MQTT intake: a request line is at most :data:`MAX_LINE` bytes (a longer one gets an error reply
and the connection is closed), a started line must end within ``read_timeout`` and an idle connection is closed
after ``idle_timeout`` (seconds), and at most ``max_connections`` are served at once, plus a reserve that only
root (the peer's uid, ``SO_PEERCRED``) may use; one more gets a ``too_many_connections`` reply and the agent logs
the refusal (rate-limited). A handler that raises costs one error reply, never the server's thread. A
:class:`Client` whose kept connection was closed as idle connects again for its next request.

A socket file left by a crashed agent is replaced only once nobody answers on it; if an agent answers,
:class:`ControlServer.start` raises :class:`ControlBusy`. :meth:`ControlServer.close` unlinks the socket only
while the file is still its own.

This module is what both ends share (the errors, the path, the encoding) and the client (:class:`Client`,
:func:`request`); the server is :mod:`device.agent.controlserver`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import Any, Mapping

from device.errors import Exit, FieldnodeError
from device.link import wire

SOCKET_NAME = "control.sock"
MAX_LINE = 64 * 1024  # a request line, without its newline
MAX_REPLY = 8 * 1024 * 1024  # what a client reads before it gives up on a reply
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL
_START = "start it with systemctl start fieldnode"


class ControlBusy(FieldnodeError):
    """Another agent answers on the control socket this one was to listen on."""

    code = "control_busy"


class ControlSocketError(FieldnodeError):
    """The control socket cannot be made: its directory, a file in its place, a path too long for a socket."""

    code = "control_socket"


class ControlUnavailable(FieldnodeError):
    """No agent can be reached on the control socket (none running, no permission, it does not answer)."""

    code = "agent_unreachable"
    exit_code = Exit.UNREACHABLE


class ControlProtocolError(FieldnodeError):
    """What answered on the control socket sent something that is not a reply of this protocol."""

    code = "control_reply_malformed"


class ControlError(FieldnodeError):
    """The agent answered with an error; ``code`` is the agent's code and ``as_json()`` its whole error object."""

    code = "control_error"

    def __init__(self, code: str, message: str, error: Mapping[str, Any] | None = None):
        self.code = code
        self.error = dict(error or {"code": code, "message": message})
        super().__init__(message)

    def as_json(self) -> dict:
        return dict(self.error)


def socket_path(cfg) -> str:
    """The control socket of the agent that ``cfg`` configures: ``<device.runtime_dir>/control.sock``."""
    return os.path.join(cfg.device.runtime_dir, SOCKET_NAME)


def socket_peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end (for a listening socket's clients: the one that listens)."""
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
        return pid or None
    except (OSError, AttributeError):  # SO_PEERCRED is Linux's
        return None


def path_problem(path: str) -> str | None:
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        return (f"the path is longer than the {_MAX_UNIX_PATH} bytes a Unix socket allows; set a shorter "
                f"device.runtime_dir")
    return None


def encode_line(doc: dict) -> bytes:
    """A reply as one line, in the MQTT replies' encoding."""
    # Strict, like the MQTT replies: what the status command cannot publish, this socket does not answer either.
    return wire.encode(doc) + b"\n"


def now() -> float:
    """The monotonic clock the deadlines of both ends use."""
    return time.monotonic()


# ------------------------------------------------------------------------------------------------------ client


class _ClosedBeforeReply(ControlUnavailable):
    """The connection ended before any byte of the reply (a kept connection closed as idle, an agent stopping)."""


class Client:
    """One connection to the agent's control socket, kept open across requests (``fieldnode status --watch``).

    Not thread-safe. After a failed request the connection is dropped, and the next request connects again.

    Args:
        path: The socket file (:func:`socket_path`).
        timeout: Seconds to connect, and to wait for each reply.
        group: The group that may use the socket, named in the permission-denied message.
    """

    def __init__(self, path: str, *, timeout: float = 2.0, group: str = "fieldnode"):
        self.path = os.fspath(path)
        self.timeout = timeout
        self.group = group
        self.peer_pid: int | None = None  # the agent's pid, once connected
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Connects (again).

        Raises:
            ControlUnavailable: With what a technician can do about it.
        """
        self.close()
        problem = path_problem(self.path)
        if problem:
            raise ControlUnavailable(f"cannot reach the agent at {self.path}: {problem}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise self._unreachable(exc) from None
        self._sock, self.peer_pid = sock, socket_peer_pid(sock)

    def request(self, op: str, args: dict | None = None) -> Any:
        """Sends one request and returns its ``result``.

        Raises:
            ControlUnavailable: The agent cannot be reached, does not answer in time, or closed the connection.
            ControlError: The agent answered with an error (its code and message).
            ControlProtocolError: The answer is not a reply of this protocol.
        """
        line = wire.encode({"op": op, "args": args or {}}, strict=True) + b"\n"
        if self._sock is not None:
            try:
                return self._exchange(op, line)
            except _ClosedBeforeReply:
                pass  # the agent closed our kept connection as idle (or restarted): once more, on a new one
        self.connect()
        return self._exchange(op, line)

    def _exchange(self, op: str, line: bytes) -> Any:
        try:
            self._sock.settimeout(self.timeout)
            try:
                self._sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed on us: a refusal (too many connections) may wait to be read; else EOF below
            raw = self._read_line(op)
        except OSError as exc:
            self.close()
            if isinstance(exc, socket.timeout):
                raise ControlUnavailable(f"the agent at {self.path} did not answer '{op}' within {self.timeout:g} s "
                                         f"(it may be hung: see systemctl status fieldnode)") from None
            raise ControlUnavailable(f"the connection to the agent at {self.path} broke ({exc.strerror or exc}); "
                                     f"it may be stopping or restarting") from None
        except ControlUnavailable:
            self.close()
            raise
        try:
            doc = wire.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            self.close()
            raise ControlProtocolError(f"what answers at {self.path} sent a reply that is not JSON ({exc})") from None
        problem = wire.reply_problem(doc)
        if problem is None and doc["ok"] and "result" not in doc:
            problem = "an ok reply without 'result'"
        if problem is not None:
            self.close()
            raise ControlProtocolError(f"what answers at {self.path} is not a fieldnode agent of this version: "
                                       f"{problem}")
        if not doc["ok"]:
            err = doc["error"]
            raise ControlError(err["code"], err["message"], err)
        return doc["result"]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buf = bytearray()

    def _read_line(self, op: str) -> bytes:
        deadline = now() + self.timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = bytes(self._buf[:nl]), self._buf[nl + 1:]
                return line
            if len(self._buf) > MAX_REPLY:
                raise ControlUnavailable(f"the reply of the agent at {self.path} to '{op}' is longer than "
                                         f"{MAX_REPLY} bytes")
            left = deadline - now()
            if left <= 0:
                raise socket.timeout()
            self._sock.settimeout(left)
            data = self._sock.recv(65536)
            if not data:
                if not self._buf:
                    raise _ClosedBeforeReply(f"the agent at {self.path} closed the connection before answering "
                                             f"'{op}' (it may be stopping or restarting)")
                raise ControlUnavailable(f"the agent at {self.path} closed the connection before answering '{op}' "
                                         f"(it may be stopping or restarting)")
            self._buf += data

    def _unreachable(self, exc: OSError) -> ControlUnavailable:
        p = self.path
        if isinstance(exc, FileNotFoundError):
            return ControlUnavailable(f"no agent is running here (no control socket at {p}): {_START}")
        if isinstance(exc, PermissionError):
            return ControlUnavailable(f"permission denied on the agent's control socket {p}: join the {self.group} "
                                      f"group (sudo usermod -aG {self.group} $USER, then log in again)")
        if isinstance(exc, ConnectionRefusedError):
            return ControlUnavailable(f"no agent answers on {p} (connection refused: it stopped or is restarting): "
                                      f"{_START}, or see systemctl status fieldnode")
        if isinstance(exc, socket.timeout) or exc.errno == errno.EAGAIN:
            return ControlUnavailable(f"the agent at {p} does not accept connections (it may be hung or "
                                      f"overloaded: see systemctl status fieldnode)")
        return ControlUnavailable(f"cannot reach the agent at {p}: {exc.strerror or exc}")


def request(path: str, op: str, args: dict | None = None, *, timeout: float = 2.0) -> Any:
    """One request on a connection of its own; returns its ``result``.

    Raises:
        ControlUnavailable, ControlError, ControlProtocolError: As :meth:`Client.request`.
    """
    with Client(path, timeout=timeout) as client:
        return client.request(op, args)

