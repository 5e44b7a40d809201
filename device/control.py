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

Bounded like the MQTT intake: a request line is at most :data:`MAX_LINE` bytes (a longer one gets an error reply
and the connection is closed), a started line must end within ``read_timeout`` and an idle connection is closed
after ``idle_timeout``, and at most ``max_connections`` are served at once (one more gets a
``too_many_connections`` reply). A handler that raises costs one error reply, never the server's thread.

A socket file left by a crashed agent is replaced only once nobody answers on it; if an agent answers,
:class:`ControlServer.start` raises :class:`ControlBusy`. :meth:`ControlServer.close` unlinks the socket only
while the file is still its own.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from typing import Any, Callable, Mapping

from device.errors import FieldnodeError, error_json
from device.link import wire
from device.link.errors import BadJson, BadRequest, CommandCrashed, PayloadTooLarge, UnknownCommand

log = logging.getLogger(__name__)

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


class ControlProtocolError(FieldnodeError):
    """What answered on the control socket sent something that is not a reply of this protocol."""

    code = "reply_malformed"


class ControlError(FieldnodeError):
    """The agent answered with an error; ``code`` is the agent's code and ``as_json()`` its whole error object."""

    code = "control_error"

    def __init__(self, code: str, message: str, error: Mapping[str, Any] | None = None):
        self.code = code
        self.error = dict(error or {"code": code, "message": message})
        super().__init__(message)

    def as_json(self) -> dict:
        return dict(self.error)


class _TooManyConnections(FieldnodeError):
    code = "too_many_connections"


def socket_path(cfg) -> str:
    """The control socket of the agent that ``cfg`` configures: ``<device.runtime_dir>/control.sock``."""
    return os.path.join(cfg.device.runtime_dir, SOCKET_NAME)


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end (for a listening socket's clients: the one that listens)."""
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
        return pid or None
    except (OSError, AttributeError):  # SO_PEERCRED is Linux's
        return None


def _path_problem(path: str) -> str | None:
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        return f"the path is longer than the {_MAX_UNIX_PATH} bytes a Unix socket allows; set a shorter device.runtime_dir"
    return None


# ------------------------------------------------------------------------------------------------------ server


class ControlServer:
    """Serves ``handlers`` on a Unix stream socket at ``path``, one JSON request per line.

    Args:
        path: The socket file (:func:`socket_path`).
        handlers: ``op -> handler(args) -> result``; each runs on the connection's thread and returns a JSON value.
        mode: The socket file's mode.
        group: The group given the socket (and the directory, when this server creates it), if it exists here.
        max_connections: Connections served at once.
        read_timeout: Seconds a started request line has to end (and a reply has to be taken).
        idle_timeout: Seconds a connection may wait between requests.
    """

    def __init__(self, path: str, handlers: Mapping[str, Callable[[dict], Any]], *, mode: int = 0o660,
                 group: str | None = "fieldnode", max_connections: int = 8, read_timeout: float = 10.0,
                 idle_timeout: float = 120.0):
        self.path = os.fspath(path)
        self.handlers = dict(handlers)
        self.mode, self.group = mode, group
        self.max_connections = max_connections
        self.read_timeout, self.idle_timeout = read_timeout, idle_timeout
        self._sock: socket.socket | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._closing = threading.Event()

    def __enter__(self) -> "ControlServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Makes the socket (replacing a stale one) and starts accepting.

        Raises:
            ControlBusy: Another process answers on ``path``.
            ControlSocketError: The directory cannot be made, a non-socket file is in the way, the path is too
                long, or the socket cannot be bound.
        """
        if self._sock is not None:
            raise RuntimeError("the control server has started already")
        problem = _path_problem(self.path)
        if problem:
            raise ControlSocketError(f"control socket {self.path}: {problem}")
        self._make_directory()
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            st = os.lstat(self.path)
            self._ident = (st.st_dev, st.st_ino)
            os.chmod(self.path, self.mode)
            self._give_group(self.path)
            sock.listen(16)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if self._ident is not None:
                self._unlink_own()
            raise ControlSocketError(f"cannot make the control socket {self.path}: {exc.strerror or exc}") from exc
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._closing.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        log.info("control socket %s (mode %o)", self.path, self.mode)

    def close(self) -> None:
        """Stops accepting, ends the connections (waiting a moment for a handler), unlinks our own socket file."""
        if self._sock is None:
            return
        self._closing.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv
            except OSError:
                pass
        for _, t in conns:
            t.join(2)  # a handler stuck in the agent cannot be interrupted; its thread is a daemon
        self._sock.close()
        self._sock = None
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1
        self._unlink_own()

    # -------------------------------------------------------------------------------------------- setup

    def _make_directory(self) -> None:
        directory = os.path.dirname(self.path) or "."
        if os.path.isdir(directory):
            return  # systemd's RuntimeDirectory, or a directory someone chose: its owner set its mode
        try:
            os.makedirs(directory, mode=0o750)
            os.chmod(directory, 0o750)  # makedirs' mode passes through the umask
            self._give_group(directory)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ControlSocketError(f"cannot create the control socket's directory {directory}: "
                                     f"{exc.strerror or exc} (device.runtime_dir)") from exc

    def _give_group(self, path: str) -> None:
        if not self.group:
            return
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:  # a development machine: no such group, and nobody else to let in
            log.debug("no group %r here: %s keeps its owner's group", self.group, path)
            return
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            log.warning("cannot give %s to the group %s (%s): only its owner can use it", path, self.group,
                        exc.strerror or exc)

    def _clear_stale(self) -> None:
        """Unlinks a socket file nobody answers on; refuses when someone does, or when it is not a socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlSocketError(f"cannot check the control socket {self.path}: {exc.strerror or exc}") from exc
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{self.path} exists and is not a socket; move it away (it is not removed "
                                     f"automatically)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
            pid = _peer_pid(probe)
        except (ConnectionRefusedError, FileNotFoundError):
            pid = None  # nobody listens: left by a crash
        except (socket.timeout, BlockingIOError) as exc:  # a listener with a full queue: alive, but stuck
            raise ControlBusy(f"another process holds the control socket {self.path} and does not accept "
                              f"connections; stop it first (systemctl stop fieldnode)") from exc
        except OSError as exc:
            raise ControlSocketError(f"cannot check the control socket {self.path}: {exc.strerror or exc}") from exc
        else:
            who = f"an agent (pid {pid})" if pid else "another agent"
            raise ControlBusy(f"{who} already answers on the control socket {self.path}; stop it first "
                              f"(systemctl stop fieldnode) or give this one another device.runtime_dir")
        finally:
            probe.close()
        log.info("replacing the stale control socket %s (nobody answers on it)", self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ControlSocketError(f"cannot remove the stale control socket {self.path}: "
                                     f"{exc.strerror or exc}") from exc

    def _unlink_own(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
            else:
                log.debug("%s is not our socket any more: left in place", self.path)
        except OSError:
            pass
        self._ident = None

    # ------------------------------------------------------------------------------------------ serving

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closing.is_set():
            try:
                poller.poll()
            except InterruptedError:
                continue
            if self._closing.is_set():
                break
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # EMFILE and the like: wait a moment rather than spin
                log.warning("control socket: cannot accept a connection: %s", exc.strerror or exc)
                self._closing.wait(0.5)
                continue
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    t = threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True)
                    self._conns[conn] = t
            if full:
                self._refuse(conn)
            else:
                t.start()

    def _refuse(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)  # best effort: a refusal never waits on the client
            conn.send(_encode_reply(error_json(_TooManyConnections(
                f"the agent serves {self.max_connections} control connections already; try again shortly"))))
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._converse(conn)
        except OSError as exc:  # the client went away, or close() shut the connection
            log.debug("control connection ended: %s", exc)
        except Exception:  # never expected: the handlers' failures are caught in _answer
            log.exception("control connection failed")
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _converse(self, conn: socket.socket) -> None:
        buf = bytearray()
        line_deadline = None
        while not self._closing.is_set():
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:
                    self._send(conn, error_json(PayloadTooLarge(
                        f"request line longer than {MAX_LINE} bytes; the connection is closed")))
                    return
                if buf:
                    if line_deadline is None:
                        line_deadline = _now() + self.read_timeout
                    timeout = line_deadline - _now()
                else:
                    timeout = self.idle_timeout
                if timeout <= 0:
                    self._send(conn, error_json(BadRequest(
                        f"request line not ended within {self.read_timeout:g} s; the connection is closed")))
                    return
                conn.settimeout(timeout)
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    if buf:
                        continue  # the deadline check above replies
                    return  # idle too long: closed quietly, a client reconnects
                if not data:
                    if buf.strip():  # `printf '{"op":"status"}' | socat - UNIX:...`: a last line without newline
                        self._send(conn, self._answer(bytes(buf)))
                    return
                buf += data
                continue
            line, buf = bytes(buf[:nl]), buf[nl + 1:]
            line_deadline = None
            if len(line) > MAX_LINE:
                self._send(conn, error_json(PayloadTooLarge(
                    f"request line longer than {MAX_LINE} bytes; the connection is closed")))
                return
            self._send(conn, self._answer(line))

    def _send(self, conn: socket.socket, doc: dict) -> None:
        conn.settimeout(self.read_timeout)  # a client that does not read its reply is dropped
        conn.sendall(_encode_reply(doc))

    def _answer(self, line: bytes) -> dict:
        """The reply to one request line; never raises."""
        try:
            req = wire.parse_object(line.rstrip(b"\r"))
        except ValueError as exc:
            why = f"request {exc}"
            if "expected" not in why:
                why += '; expected {"op": NAME, "args": {...}}'
            return error_json(BadJson(why))
        op, args = req.get("op"), req.get("args", {})
        unknown = sorted(set(req) - {"op", "args"})
        if unknown:
            return error_json(BadRequest(f"unknown field {', '.join(map(repr, unknown))}; a request has 'op' and "
                                         f"'args'"))
        if not isinstance(op, str) or not op:
            return error_json(BadRequest("'op' is missing or not a non-empty string"))
        if not isinstance(args, dict):
            return error_json(BadRequest("'args' must be a JSON object"))
        handler = self.handlers.get(op)
        if handler is None:
            shown = op if len(op) <= 64 else op[:61] + "..."
            return error_json(UnknownCommand(f"unknown op {shown!r}; this agent answers "
                                             f"{', '.join(sorted(self.handlers)) or 'nothing'}"))
        try:
            result = handler(args)
        except FieldnodeError as exc:
            return error_json(exc)
        except (Exception, SystemExit) as exc:  # a handler calling sys.exit() must not end the connection thread
            log.exception("control op %s failed", op)
            return error_json(CommandCrashed(f"op '{op}' failed: {type(exc).__name__} (see the agent's log)"))
        doc = {"ok": True, "result": result}
        try:
            _encode_reply(doc)
        except (TypeError, ValueError, RecursionError) as exc:  # the handler's bug, like a crash
            log.error("control op %s returned a result that is not JSON: %s", op, exc)
            return error_json(CommandCrashed(f"op '{op}' returned a result that is not JSON ({type(exc).__name__})"))
        return doc


def _encode_reply(doc: dict) -> bytes:
    # The MQTT replies' encoding (strict: what the status command cannot publish, this socket does not either).
    return wire.encode(doc) + b"\n"


def _now() -> float:
    return time.monotonic()


# ------------------------------------------------------------------------------------------------------ client


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
        problem = _path_problem(self.path)
        if problem:
            raise ControlUnavailable(f"cannot reach the agent at {self.path}: {problem}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise self._unreachable(exc) from None
        self._sock, self.peer_pid = sock, _peer_pid(sock)

    def request(self, op: str, args: dict | None = None) -> Any:
        """Sends one request and returns its ``result``.

        Raises:
            ControlUnavailable: The agent cannot be reached, does not answer in time, or closed the connection.
            ControlError: The agent answered with an error (its code and message).
            ControlProtocolError: The answer is not a reply of this protocol.
        """
        if self._sock is None:
            self.connect()
        line = wire.encode({"op": op, "args": args or {}}, strict=True) + b"\n"
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
        deadline = _now() + self.timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = bytes(self._buf[:nl]), self._buf[nl + 1:]
                return line
            if len(self._buf) > MAX_REPLY:
                raise ControlUnavailable(f"the reply of the agent at {self.path} to '{op}' is longer than "
                                         f"{MAX_REPLY} bytes")
            left = deadline - _now()
            if left <= 0:
                raise socket.timeout()
            self._sock.settimeout(left)
            data = self._sock.recv(65536)
            if not data:
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
