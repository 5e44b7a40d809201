"""The local control socket (device/control.py) with real Unix sockets, threads and processes: requests on one
connection, every malformed line, the line bound, unknown ops, handlers that raise, stale and foreign files, a
second server refused, timeouts, the connection cap, the socket's mode and group, and the client's messages."""

from __future__ import annotations

import grp
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from device.agent.controlserver import ControlServer
from device.control import (MAX_LINE, Client, ControlBusy, ControlError, ControlProtocolError,
                            ControlSocketError, ControlUnavailable, request, socket_path)
from device.errors import ConfigError
from device.link.commands import Arg, Registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one(name, fn) -> Registry:
    """A registry of one local command ``name`` answering ``fn()``."""
    reg = Registry()
    reg.register(name, lambda args, ctx: fn(), local=True)
    return reg


def handlers(calls=None) -> Registry:
    """The registry the socket serves in these tests: local commands, and one privileged command it must not."""
    def status(args, ctx):
        return {"device": "dev-a", "simulated": True}

    def echo(args, ctx):
        if calls is not None:
            calls.append((threading.current_thread().name, args))
        return args

    def config_error(args, ctx):
        raise ConfigError("must be a number", "power.step_s", "fieldnode.toml")

    def crash(args, ctx):
        raise RuntimeError("boom")

    def leave(args, ctx):
        sys.exit(3)

    reg = Registry()
    for name, fn in (("status", status), ("config_error", config_error), ("crash", crash), ("exit", leave),
                     ("object", lambda args, ctx: object()), ("nan", lambda args, ctx: {"x": float("nan")})):
        reg.register(name, fn, local=True)
    reg.register("echo", echo, local=True, args=(Arg("n", int), Arg("s", str), Arg("k", list)))
    reg.register("variant", lambda args, ctx: "pinned", privileged=True)
    return reg


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "run" / "control.sock")


@pytest.fixture
def server(path):
    s = ControlServer(path, handlers(), group=None)
    s.start()
    yield s
    s.close()


def raw(path, timeout=5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def read_lines(sock, n: int) -> list[dict]:
    """n reply lines, or fewer if the server closes first."""
    buf = b""
    while buf.count(b"\n") < n:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return [json.loads(line) for line in buf.split(b"\n") if line]


def at_eof(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_socket_path_is_in_the_runtime_directory():
    class Cfg:
        class device:
            runtime_dir = "/run/fieldnode"

    assert socket_path(Cfg) == "/run/fieldnode/control.sock"


def test_requests_on_one_connection_run_on_the_servers_threads(path):
    calls = []
    with ControlServer(path, handlers(calls), group=None):
        with Client(path) as c:
            assert c.request("status") == {"device": "dev-a", "simulated": True}
            assert c.request("echo", {"n": 1, "s": "ü"}) == {"n": 1, "s": "ü"}
            assert c.request("echo") == {}
            assert c.peer_pid == os.getpid()  # SO_PEERCRED: the process that listens
        assert request(path, "echo", {"k": [1, 2]}) == {"k": [1, 2]}
    assert [a for _, a in calls] == [{"n": 1, "s": "ü"}, {}, {"k": [1, 2]}]
    assert all(name == "control-conn" for name, _ in calls)
    assert not os.path.exists(path)  # close() unlinked it


def test_the_socket_is_0660_in_a_0750_directory_of_the_group(tmp_path):
    # A group other than ours that this process may give files to (root: any; else a supplementary group).
    mine = os.getegid()
    gids = [g.gr_gid for g in grp.getgrall()] if os.geteuid() == 0 else os.getgroups()
    other = [g for g in gids if g != mine]
    assert other, "the test needs a second group to give the socket to"
    group = grp.getgrgid(other[0]).gr_name
    path = str(tmp_path / "made" / "control.sock")
    with ControlServer(path, handlers(), group=group):
        st, dst = os.stat(path), os.stat(os.path.dirname(path))
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert stat.S_IMODE(dst.st_mode) == 0o750  # made by the server, whatever the umask
        assert st.st_gid == dst.st_gid == other[0]


def test_a_group_that_does_not_exist_is_skipped_quietly(path, caplog):
    caplog.set_level(logging.DEBUG, logger="device.agent.controlserver")
    with ControlServer(path, handlers(), group="no-such-group-fieldnode"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert request(path, "status")["device"] == "dev-a"
    assert any("no group 'no-such-group-fieldnode'" in r.getMessage() and r.levelno == logging.DEBUG
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_existing_directory_keeps_its_mode(tmp_path):
    d = tmp_path / "rt"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with ControlServer(str(d / "control.sock"), handlers(), group=None):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755


def test_malformed_lines_get_an_error_each_and_the_connection_stays(server, path):
    lines = [b"garbage", b"[1]", b'{"args": {}}', b'{"op": "", "args": {}}', b'{"op": "status", "args": []}',
             b'{"op": "status", "id": 1}', b"\xff\xfe{}", b"", b'{"op": "status", "args": {"x": NaN}}',
             b'{"op": "status"}\r']
    with raw(path) as s:
        s.sendall(b"\n".join(lines) + b"\n")
        replies = read_lines(s, len(lines))
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    assert codes == ["bad_json", "bad_json", "bad_request", "bad_request", "bad_request", "bad_request",
                     "bad_json", "bad_json", "bad_json", "ok"]
    assert "not UTF-8" in replies[6]["error"]["message"]
    assert "'id'" in replies[5]["error"]["message"]
    assert replies[-1] == {"ok": True, "result": {"device": "dev-a", "simulated": True}}


def test_a_line_of_the_limit_is_served_and_a_longer_one_closes_the_connection(server, path):
    head, tail = b'{"op": "echo", "args": {"s": "', b'"}}'
    exact = head + b"a" * (MAX_LINE - len(head) - len(tail)) + tail
    assert len(exact) == MAX_LINE
    with raw(path) as s:
        s.sendall(exact + b"\n")
        (reply,) = read_lines(s, 1)
        assert reply["ok"] and len(reply["result"]["s"]) == MAX_LINE - len(head) - len(tail)
        s.sendall(b"a" * (MAX_LINE + 1))  # no newline: the bound holds before the line ends
        (reply,) = read_lines(s, 1)
        assert reply["error"]["code"] == "payload_too_large" and str(MAX_LINE) in reply["error"]["message"]
        assert at_eof(s)
    with raw(path) as s:  # and with its newline, in one go
        s.sendall(b"b" * (MAX_LINE + 1) + b"\n")
        assert read_lines(s, 1)[0]["error"]["code"] == "payload_too_large"
        assert at_eof(s)
    assert request(path, "status")["device"] == "dev-a"  # the server is fine


def test_a_last_line_without_newline_is_answered(server, path):
    with raw(path) as s:  # printf '{"op":"status"}' | socat - UNIX-CONNECT:...
        s.sendall(b'{"op": "status"}')
        s.shutdown(socket.SHUT_WR)
        assert read_lines(s, 1) == [{"ok": True, "result": {"device": "dev-a", "simulated": True}}]


def test_an_unknown_op_names_the_ops_the_agent_answers(server, path):
    with pytest.raises(ControlError) as e:
        request(path, "reboot")
    assert e.value.code == "unknown_command"
    assert "'reboot'" in str(e.value) and "echo" in str(e.value) and "status" in str(e.value)
    assert "variant" not in str(e.value)  # registered, but privileged: not served here
    with pytest.raises(ControlError) as e:
        request(path, "variant")
    assert e.value.code == "unknown_command" and "fieldnode send" in str(e.value)


def test_a_handler_that_raises_costs_one_error_reply_never_the_server(server, path):
    with Client(path) as c:
        with pytest.raises(ControlError) as e:
            c.request("config_error")
        assert e.value.code == "config_invalid"
        assert e.value.as_json() == {"code": "config_invalid", "key": "power.step_s", "message": "must be a number",
                                     "source": "fieldnode.toml"}
        for op, words in (("crash", "RuntimeError"), ("exit", "SystemExit"), ("object", "not JSON"),
                          ("nan", "not JSON")):
            with pytest.raises(ControlError) as e:
                c.request(op)
            assert e.value.code == "internal" and words in str(e.value), op
        assert c.request("status")["device"] == "dev-a"  # same connection, same thread, still serving


def test_a_stale_socket_file_is_replaced(path):
    os.makedirs(os.path.dirname(path))
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(path)  # a crashed agent's socket: the file stays, nobody listens
    crashed.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with pytest.raises(ControlUnavailable, match="connection refused"):
        request(path, "status")
    with ControlServer(path, handlers(), group=None):
        assert request(path, "status")["device"] == "dev-a"


def test_a_file_that_is_not_a_socket_is_left_alone(path):
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("notes")
    with pytest.raises(ControlSocketError, match="not a socket"):
        ControlServer(path, handlers(), group=None).start()
    with open(path) as f:
        assert f.read() == "notes"


def test_a_second_server_on_the_same_path_is_refused(server, path):
    with pytest.raises(ControlBusy) as e:
        ControlServer(path, Registry(), group=None).start()
    assert e.value.code == "control_busy" and path in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    # ... and from another process, through its own import of the module
    code = ("import sys; from device.agent.controlserver import ControlServer\nfrom device.control import ControlBusy\n"
            "from device.link.commands import Registry\n"
            "try:\n    ControlServer(sys.argv[1], Registry(), group=None).start()\n"
            "except ControlBusy as e:\n    print(e.code); sys.exit(3)\n")
    p = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (p.returncode, p.stdout.strip()) == (3, "control_busy"), p.stderr
    assert request(path, "status")["device"] == "dev-a"  # the first one still serves


def test_close_unlinks_only_its_own_socket(path):
    first = ControlServer(path, one("who", lambda: "first"), group=None)
    first.start()
    os.unlink(path)  # someone removed it, and another server took the path
    with ControlServer(path, one("who", lambda: "second"), group=None):
        first.close()
        assert request(path, "who") == "second"
    assert not os.path.exists(path)


def test_close_ends_open_connections(path):
    s = ControlServer(path, handlers(), group=None)
    s.start()
    idle = raw(path)
    idle.sendall(b'{"op": "status"}\n')
    assert read_lines(idle, 1)[0]["ok"]
    s.close()
    assert at_eof(idle)
    idle.close()
    assert not os.path.exists(path)


def test_slow_and_idle_connections_are_closed(path):
    with ControlServer(path, handlers(), group=None, read_timeout=0.2, idle_timeout=0.3):
        with raw(path) as slow:
            slow.sendall(b'{"op": "sta')  # never ends its line
            (reply,) = read_lines(slow, 1)
            assert reply["error"]["code"] == "bad_request" and "not ended within 0.2 s" in reply["error"]["message"]
            assert at_eof(slow)
        with raw(path) as idle:
            assert at_eof(idle)  # closed quietly, no reply
        with Client(path) as c:  # a client whose connection was closed reconnects on its next request
            assert c.request("status")["device"] == "dev-a"


def test_connections_beyond_the_cap_are_refused_politely(path):
    with ControlServer(path, handlers(), group=None, max_connections=2, root_connections=0):
        held = [raw(path), raw(path)]
        for s in held:  # both are being served (their threads counted)
            s.sendall(b'{"op": "status"}\n')
            assert read_lines(s, 1)[0]["ok"]
        with raw(path) as extra:
            (reply,) = read_lines(extra, 1)
            assert reply["error"]["code"] == "too_many_connections"
            assert at_eof(extra)
        with pytest.raises(ControlError) as e:
            request(path, "status")
        assert e.value.code == "too_many_connections"
        held.pop().close()
        deadline = time.monotonic() + 10  # the served connection's thread notices its end
        while True:
            try:
                assert request(path, "status")["device"] == "dev-a"
                break
            except ControlError:
                assert time.monotonic() < deadline, "a freed connection slot was never reused"
                time.sleep(0.02)
        held[0].close()


def test_the_client_says_what_to_do(tmp_path, path):
    with pytest.raises(ControlUnavailable) as e:
        request(path, "status")
    assert e.value.code == "agent_unreachable"
    assert str(e.value) == (f"no agent is running here (no control socket at {path}): start it with "
                            f"systemctl start fieldnode")
    # a listener that never accepts: the connection queues, no answer comes
    os.makedirs(os.path.dirname(path))
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(path)
    hung.listen(1)
    try:
        with pytest.raises(ControlUnavailable, match="did not answer 'status' within 0.2 s"):
            request(path, "status", timeout=0.2)
    finally:
        hung.close()
        os.unlink(path)
    long_path = str(tmp_path / ("x" * 120) / "control.sock")
    with pytest.raises(ControlUnavailable, match="longer than"):
        request(long_path, "status")
    with pytest.raises(ControlSocketError, match="device.runtime_dir"):
        ControlServer(long_path, Registry(), group=None).start()


def test_permission_denied_says_to_join_the_group(tmp_path):
    # A directory anyone may cross, so that the socket's own mode (0660, root's group) is what refuses.
    base = tempfile.mkdtemp(prefix="fn-ctl-")
    try:
        os.chmod(base, 0o755)
        path = os.path.join(base, "control.sock")
        with ControlServer(path, handlers(), group=None):
            drop = ("os.setgid(65534); os.setgroups([]); os.setuid(65534)" if os.geteuid() == 0
                    else f"os.chmod({path!r}, 0)")  # root passes every permission check: ask as nobody
            code = (f"import os, sys\nfrom device.control import request, ControlUnavailable\n{drop}\n"
                    f"try:\n    request(sys.argv[1], 'status')\nexcept ControlUnavailable as e:\n    print(e)\n")
            p = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, cwd=ROOT,
                               timeout=60)
            assert p.returncode == 0, p.stderr
            assert p.stdout.strip() == (f"permission denied on the agent's control socket {path}: join the fieldnode "
                                        f"group (sudo usermod -aG fieldnode $USER, then log in again)")
    finally:
        shutil.rmtree(base)


def test_something_else_answering_is_a_protocol_error(path):
    os.makedirs(os.path.dirname(path))
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen(4)

    def answer(reply: bytes):
        conn, _ = other.accept()
        with conn:
            conn.recv(1000)
            conn.sendall(reply)

    try:
        for reply, words in ((b"hello\n", "not JSON"), (b'{"ok": true}\n', "without 'result'"),
                             (b'{"ok": false, "error": "x"}\n', "not a fieldnode agent")):
            t = threading.Thread(target=answer, args=(reply,))
            t.start()
            with pytest.raises(ControlProtocolError, match=words):
                request(path, "status")
            t.join(5)
    finally:
        other.close()


def test_a_socket_already_in_the_group_is_not_chowned_again(path, caplog, mocker):
    """Under the unit (Group=fieldnode, SystemCallFilter=~@privileged) chown is refused with EPERM: a socket that
    already has the group must not try it, nor warn."""
    group = grp.getgrgid(os.getegid()).gr_name  # the group new files get anyway, as under Group=fieldnode
    refused = mocker.patch("device.agent.controlserver.os.chown", side_effect=PermissionError(1, "Operation not permitted"))
    caplog.set_level(logging.DEBUG, logger="device.agent.controlserver")
    with ControlServer(path, handlers(), group=group):
        assert request(path, "status")["device"] == "dev-a"
    assert not refused.called
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
