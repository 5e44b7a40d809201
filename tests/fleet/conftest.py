"""The fleet tools' tests: the MQTT-link tests' real mosquitto and clients (tests/link/conftest.py), and one small
fleet of real boards per test module (:func:`fleet`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.fleet.boards import Board, ChildBoard, key_pair
from tests.link.broker import Broker
from tests.link.conftest import MqttTestClient, broker, mqtt_client, pki, run_broker  # noqa: F401 - fixtures
from tests.waiting import eventually


@dataclass
class Fleet:
    """What :func:`fleet` made: the broker, the operator's key, the ``--known`` file and the boards."""

    broker: Broker
    root: Path
    key: Path
    known: Path
    boards: dict

    def cli(self, *words: str) -> list[str]:
        return [*words, "--broker", self.broker.url, "--timeout", "20"]


def retained(watcher: MqttTestClient) -> dict[str, bytes]:
    """The last message of each state topic the watcher saw, by board id."""
    return {m.topic.split("/")[2]: m.payload for m in watcher.messages("fieldnode/v1/+/state")}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Six boards and two unreadable states, as the broker retains them:

    ``dev-a`` online (site-a, vibration 1.0.0, idle), ``dev-b`` online (site-a and ring-1, 1.1.0, trial), ``dev-c``
    online (site-b, 1.1.0), ``dev-d`` stopped cleanly (offline; was site-a, 1.0.0), ``dev-e`` killed (lost by its
    will; was site-a, 1.0.0), ``dev-f`` online (site-a, 1.0.0) with a trust directory that lacks the operator's
    key, ``dev-x`` not JSON, ``dev-y`` a state that does not exist. The ``--known`` file was written while dev-d
    and dev-e were online.
    """
    from tools import cli

    root = tmp_path_factory.mktemp("fleet")
    gen = run_broker(tmp_path_factory, "plain", None)
    broker = next(gen)
    key = key_pair(root, "ops")
    (root / "no-trust").mkdir()
    trust = root / "trust"
    boards: dict = {}
    watcher = MqttTestClient(broker)
    child = None
    try:
        watcher.connect()
        watcher.subscribe("fieldnode/v1/+/state")
        for name, groups, kw in (("dev-a", ["site-a"], {}), ("dev-b", ["site-a", "ring-1"],
                                                              {"model": ("vibration", "1.1.0"), "update": "trial"}),
                                 ("dev-c", ["site-b"], {"model": ("vibration", "1.1.0")}),
                                 ("dev-d", ["site-a"], {}), ("dev-f", ["site-a"], {})):
            boards[name] = Board(broker.url, root, name, groups, root / "no-trust" if name == "dev-f" else trust, **kw)
        child = ChildBoard(broker.url, root, "dev-e", ["site-a"], trust)
        eventually(lambda: len(retained(watcher)) == 6, what="six online states")
        f = Fleet(broker, root, key, root / "known.json", boards)
        assert cli.main(f.cli("fleet", "status", "--known", str(f.known))) == 0
        boards.pop("dev-d").close()
        child.kill()
        watcher.publish("fieldnode/v1/dev-x/state", b"not json", retain=True)
        watcher.publish("fieldnode/v1/dev-y/state", json.dumps({"state": "sleeping"}), retain=True)

        def settled() -> bool:
            last = retained(watcher)
            return (json.loads(last["dev-d"])["state"] == "offline" and json.loads(last["dev-e"])["state"] == "lost"
                    and "dev-x" in last and "dev-y" in last)
        eventually(settled, what="dev-d offline, dev-e lost, two unreadable states")
        yield f
    finally:
        watcher.close()
        if child is not None and child.proc.poll() is None:
            child.kill()
        for b in boards.values():
            b.close()
        gen.close()
