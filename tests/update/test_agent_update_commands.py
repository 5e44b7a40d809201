"""The update commands through the agent's real dispatcher (signed envelopes, no broker needed): status for
anyone, rollback only signed, an install from a repository made with ``fieldnode repo`` that replies at once and
ends with the new model serving on trial and committed, and the refusals with their codes."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from device import config
from device.agent.commands import build_registry
from device.link.commands import Dispatcher
from device.link.envelope import TrustStore, Verifier, sign_envelope
from device.runtime.manifest import bundled_model_dir
from device.update import age
from device.update.store.store import ModelStore
from tests.update.reposim import model_repo
from tests.update.test_agent_update import DEV, Running, agent_config, put_on_trial

FULL, LITE, VECTORS = (os.path.join(bundled_model_dir(), n) for n in (
    "vibration_full.tflite", "vibration_lite.tflite", "vibration_testvectors.npz"))


class Board:
    """An operator's signed commands to a running agent, through the agent's own registry and a real verifier."""

    def __init__(self, tmp_path, agent):
        self.key = ed25519.Ed25519PrivateKey.generate()
        trust = tmp_path / "trust"
        trust.mkdir(mode=0o700)
        (trust / "operator.pub").write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.dispatcher = Dispatcher(build_registry(agent.command_ops()), verifier=Verifier(TrustStore(str(trust)), device_id=DEV))

    def send(self, cmd: str, args: dict | None = None, signed: bool = True) -> dict:
        args = args or {}
        body = sign_envelope(self.key, device=DEV, cmd=cmd, args=args, ttl_s=60) if signed else {"args": args}
        payload = json.dumps({"request_id": uuid.uuid4().hex[:12], **body}).encode()
        return json.loads(self.dispatcher.handle(cmd, payload).body)


def test_status_for_anyone_and_a_signed_rollback(tmp_path):
    state = str(tmp_path / "state")
    put_on_trial(state, 2)
    with Running(agent_config(tmp_path, trial_s=120)) as r:
        board = Board(tmp_path, r.agent)
        st = board.send("update.status", signed=False)
        assert st["ok"] and st["result"]["source"] == "store" and st["result"]["trial"]["version"] == 2
        refused = board.send("update.rollback", {"reason": "field report"}, signed=False)
        assert not refused["ok"] and refused["error"]["code"] == "unauthorized"
        assert ModelStore.for_state_dir(state).active().version == 2  # untouched
        done = board.send("update.rollback", {"reason": "field report"})
        assert done["ok"], done
        assert done["result"]["version"] == 2 and done["result"]["to"] == "bundled" and done["result"]["code"] is None
        assert r.agent.runtime.manifest.root == bundled_model_dir() and r.agent.updates.status()["trial"] is None
        again = board.send("update.rollback", {})
        assert not again["ok"] and again["error"]["code"] == "model_store_error"  # nothing installed any more
    assert ModelStore.for_state_dir(state).failed_versions("vibration")[2]["reason"] == "field report"
    assert [d["by"] for d in r.of("update_rolled_back")] == ["operator"]


def test_install_and_check_when_updates_are_off_say_which_key(tmp_path):
    with Running(agent_config(tmp_path)) as r:
        board = Board(tmp_path, r.agent)
        for cmd in ("update.install", "update.check"):
            reply = board.send(cmd)
            assert not reply["ok"] and reply["error"]["code"] == "config_invalid"
            assert "update.root_file" in reply["error"]["message"]
    assert not r.of("update_install")


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    base = tmp_path_factory.mktemp("agent-install")
    identity, recipient = age.generate_identity()
    good = {"full": (FULL, VECTORS), "lite": (LITE, VECTORS)}
    root = model_repo(str(base / "repo"), {2: good}, {DEV: recipient})
    (base / "root.json").write_bytes(root)
    (base / "board.age").write_text(identity + "\n")
    os.chmod(base / "board.age", 0o600)
    return base


def updating_config(tmp_path, repository):
    """An agent whose updates come from ``repository`` (a short trial)."""
    data = agent_config(tmp_path, trial_s=1, min_windows=4).to_dict()
    data["update"].update(root_file=str(repository / "root.json"), repository=str(repository / "repo"),
                          identity_file=str(repository / "board.age"), hwclass="rpi4")
    return config.from_mapping(data)


def test_install_by_command_replies_at_once_then_the_new_model_serves_on_trial(tmp_path, repository):
    cfg = updating_config(tmp_path, repository)
    with Running(cfg) as r:
        board = Board(tmp_path, r.agent)
        r.wait(lambda: r.agent.results >= 1, what="the bundled model serving")
        reply = board.send("update.install", {})
        assert reply["ok"] and reply["result"]["started"] is True, reply
        busy = board.send("update.install", {})  # while the first one runs, or its model is on trial
        assert not busy["ok"] and busy["error"]["code"] == "update_busy", busy
        r.wait(lambda: r.of("update_committed"), timeout=40, what="the installed model committed")
        started = board.send("update.check", {})
        assert started["ok"] and started["result"]["started"] is True, started  # at once; the outcome is an event
        r.wait(lambda: [d for d in r.of("update_check") if d["state"] != "started"], what="the check's outcome")
    states = [d["state"] for d in r.of("update_install")]
    assert states[0] == "started" and "progress" in states and states[-1] == "installed"
    installed = r.of("update_install")[-1]
    assert installed["version"] == 2 and sorted(installed["variants"]) == ["full", "lite"]
    changed = r.of("model_changed")[0]
    assert changed["from_version"] == "1.0.0" and changed["to_version"] != "1.0.0"  # the bundled model, then v2's
    assert r.of("update_trial")[0]["baseline_ms"] is not None  # the model before, measured before the switch
    assert r.of("update_committed")[0]["version"] == 2
    checked = r.of("update_check")[-1]
    assert checked["state"] == "checked" and checked["available"] is None  # nothing newer than what is installed
    assert checked["by"] == "operator"
    store = ModelStore.for_state_dir(str(tmp_path / "state"))
    assert store.active().version == 2 and store.active().state == "committed" and store.floor("vibration") == 2


def test_an_install_deferred_for_power_starts_again_by_itself_when_the_governor_allows(tmp_path, repository,
                                                                                        monkeypatch):
    """update_deferred is 'retried later': the agent keeps the request and starts it again once the governor leaves
    saver/critical (the retry interval is shortened here; it is a pacing constant, not what is tested)."""
    from device.update import agentside

    monkeypatch.setattr(agentside, "DEFERRED_RETRY_S", 0.0)
    cfg = updating_config(tmp_path, repository)
    with Running(cfg) as r:
        board = Board(tmp_path, r.agent)
        r.wait(lambda: r.agent.results >= 1, what="the bundled model serving")
        assert board.send("governor", {"level": "saver", "ttl_s": 600})["ok"]  # as on a low battery
        assert board.send("update.install", {})["ok"]
        r.wait(lambda: [d for d in r.of("update_install") if d["state"] == "deferred"], what="the install deferred")
        assert not r.of("update_committed") and ModelStore.for_state_dir(str(tmp_path / "state")).active() is None
        assert board.send("governor", {"level": "auto"})["ok"]  # the battery is charged again
        r.wait(lambda: r.of("update_committed"), timeout=40, what="the deferred install done by itself")
    states = [d["state"] for d in r.of("update_install")]
    assert states.count("started") == 2 and "deferred" in states and states[-1] == "installed"
