"""The control socket serves the agent's command registry (the one MQTT serves), its local commands only, and
holds up under idle connections: slots free themselves in seconds, root always has one, refusals are logged."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest

from device.agent.commands import Ops, build_registry
from device.agent.controlserver import ControlServer, TooManyConnections
from device.clock import SYSTEM_CLOCK
from device.control import Client, ControlError, request
from device.link.commands import Dispatcher, Registry
from device.link.errors import UnknownCommand
from tests.waiting import eventually

LOCAL = {"ping", "status", "update.status", "config.get"}


class Updates:
    def status(self) -> dict:
        return {"source": "bundled"}

    def check(self) -> dict:
        raise AssertionError("update.check must not run through the control socket")


def never(*args):
    raise AssertionError("a privileged command ran through the control socket")


def ops() -> Ops:
    return Ops(clock=SYSTEM_CLOCK, status=lambda: {"device": "dev-a", "simulated": True},
               latest_window=lambda age: None, sensor_state=lambda: "ok", infer=lambda w: None,
               config=lambda: {"runtime": {"threads": 2}}, variants=lambda: ["full"],
               pin_variant=never, set_level=never,
               release_quarantine=lambda sha, by: False, quarantined=lambda: [], updates=Updates())


def connect(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def served(s: socket.socket) -> bool:
    """Whether the connection is being served: one request answered ok (it is idle again afterwards)."""
    s.sendall(b'{"op": "ping"}\n')
    buf = b""
    while not buf.endswith(b"\n"):
        data = s.recv(65536)
        if not data:
            break
        buf += data
    return bool(buf) and json.loads(buf)["ok"] is True


def refused(path) -> bool:
    try:
        request(path, "ping", timeout=30)
    except ControlError as exc:
        return exc.code == TooManyConnections.code
    return False


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "run" / "control.sock")


# -- one router --------------------------------------------------------------------------------------------------


def test_the_socket_serves_the_agents_registry_its_local_commands_only(path):
    registry = build_registry(ops())
    assert {n for n in registry.names() if registry.get(n).local} == LOCAL
    assert all(not registry.get(n).privileged for n in LOCAL)
    with ControlServer(path, registry, group=None), Client(path, timeout=30) as c:
        assert c.request("status") == {"device": "dev-a", "simulated": True}
        assert c.request("ping")["pong"] is True  # the MQTT ping, answered by the same handler
        assert c.request("update.status") == {"source": "bundled"}
        assert c.request("config.get", {"key": "runtime.threads"}) == {"runtime.threads": 2}
        with pytest.raises(ControlError) as e:  # the registry's own argument check
            c.request("config.get", {"nope": 1})
        assert e.value.code == "bad_args" and "'nope'" in str(e.value)
        for op in ("update.check", "variant", "governor", "infer", "diag"):  # privileged, or not read-only
            with pytest.raises(ControlError) as e:
                c.request(op, {})
            assert e.value.code == UnknownCommand.code, op
            assert all(name in str(e.value) for name in LOCAL)
        assert c.request("status")["device"] == "dev-a"  # the same connection serves on
    # and the very same registry behind the MQTT dispatcher answers the same way
    reply = Dispatcher(registry).handle("config.get", b'{"args": {"key": "runtime.threads"}}')
    assert json.loads(reply.body)["result"] == {"runtime.threads": 2}


def test_a_privileged_command_cannot_be_local():
    with pytest.raises(ValueError, match="privileged command cannot be local"):
        Registry().register("x", lambda a, c: None, privileged=True, local=True)


def test_the_registry_is_required():
    with pytest.raises(TypeError, match="Registry"):
        ControlServer("/nonexistent/control.sock", {"status": lambda a: {}}, group=None)


# -- idle connections --------------------------------------------------------------------------------------------


def test_idle_connections_time_out_in_seconds_by_default(path):
    server = ControlServer(path, build_registry(ops()), group=None)
    assert server.idle_timeout <= 30 and server.read_timeout <= 30


def test_slots_held_by_idle_connections_free_themselves(path):
    with ControlServer(path, build_registry(ops()), group=None, root_connections=0, idle_timeout=5) as server:
        idle = [connect(path) for _ in range(server.max_connections)]
        try:
            assert all(served(s) for s in idle)  # admitted, then left idle
            assert refused(path)  # every slot is held ...
            eventually(lambda: not refused(path), what="a slot freed by the idle timeout")  # ... not for long
            assert server.counters["idle_closed"] >= 1
        finally:
            for s in idle:
                s.close()


def test_root_always_has_a_slot_and_refusals_are_logged_once(path, caplog):
    caplog.set_level(logging.WARNING, logger="device.agent.controlserver")
    root = {"now": False}  # whoever runs the tests, which peers count as root is decided here
    with ControlServer(path, build_registry(ops()), group=None, idle_timeout=60,
                       is_root=lambda uid: root["now"]) as server:
        members = [connect(path) for _ in range(server.max_connections)]
        try:
            assert all(served(s) for s in members)  # eight group members hold every shared slot
            assert refused(path) and refused(path) and refused(path)  # another member is refused
            root["now"] = True
            assert request(path, "status", timeout=30)["device"] == "dev-a"  # root is served all the same
            with Client(path, timeout=30) as a, Client(path, timeout=30) as b:  # root's reserve: root_connections of them at once
                assert a.request("ping")["pong"] and b.request("ping")["pong"]
                assert refused(path)  # the reserve is full too
        finally:
            for s in members:
                s.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # four refusals, said once (rate-limited)
    assert f"refused a connection of uid {os.getuid()}" in warnings[0] and "slots are in use" in warnings[0]
    assert server.counters["refused"] == 4


def test_a_kept_client_connection_closed_as_idle_connects_again(path):
    with ControlServer(path, build_registry(ops()), group=None, idle_timeout=0.2) as server, \
            Client(path, timeout=30) as c:
        assert c.request("status")["device"] == "dev-a"
        eventually(lambda: server.counters["idle_closed"] >= 1, what="the kept connection closed as idle")
        assert c.request("status")["device"] == "dev-a"  # `fieldnode status --watch --interval 60`
