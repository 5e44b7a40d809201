"""The agent's side of the local control socket: :class:`ControlServer` (the protocol: :mod:`device.control`).

One thread accepts (woken by a pipe on :meth:`ControlServer.close`), one thread per connection reads request lines
and runs the handler on itself, so a slow handler holds up only its own connection; the number of connections is
capped. Every failure of a request is an error reply; none ends a thread other than its connection's.
"""

from __future__ import annotations

import grp
import logging
import os
import select
import socket
import stat
import threading
from typing import Any, Callable, Mapping

from device.control import (MAX_LINE, ControlBusy, ControlSocketError, path_problem, socket_peer_pid, encode_line,
                            now)
from device.errors import FieldnodeError, error_json
from device.link import wire
from device.link.errors import BadJson, BadRequest, CommandCrashed, PayloadTooLarge, UnknownCommand

log = logging.getLogger(__name__)


class _TooManyConnections(FieldnodeError):
    code = "too_many_connections"


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
        problem = path_problem(self.path)
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
            if os.lstat(path).st_gid == gid:
                return  # already (the service runs as Group=fieldnode, and its filter refuses chown)
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
            pid = socket_peer_pid(probe)
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
            conn.send(encode_line(error_json(_TooManyConnections(
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
                        line_deadline = now() + self.read_timeout
                    timeout = line_deadline - now()
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
        conn.sendall(encode_line(doc))

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
            encode_line(doc)
        except (TypeError, ValueError, RecursionError) as exc:  # the handler's bug, like a crash
            log.error("control op %s returned a result that is not JSON: %s", op, exc)
            return error_json(CommandCrashed(f"op '{op}' returned a result that is not JSON ({type(exc).__name__})"))
        return doc
