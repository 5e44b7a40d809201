"""Fixtures of the end-to-end tests: a real mosquitto, an operator key made by ``fieldnode keys``, and one board
(``fieldnode run`` under a notify socket that plays systemd) shared by the checks that leave it as they found it.

A missing mosquitto fails the tests loudly (never a skip), as in tests/link.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.e2e import helpers as H
from tests.link.broker import Broker
from tests.link.conftest import MqttTestClient, run_broker


@pytest.fixture(scope="session")
def e2e_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A plain mosquitto for the shared board (the lifecycle test starts its own, since it stops it)."""
    yield from run_broker(tmp_path_factory, "plain", None)


@dataclass(frozen=True)
class OperatorKey:
    key: str  # NAME.key, what ``fieldnode send --sign`` takes
    pub: str  # NAME.pub, what a board's trust directory holds


@pytest.fixture(scope="session")
def operator_key(tmp_path_factory: pytest.TempPathFactory) -> OperatorKey:
    """An operator's signing key, made by the real ``fieldnode keys generate`` as an operator would."""
    out = tmp_path_factory.mktemp("operator")
    done = H.fieldnode("keys", "generate", "operator", "--out", str(out))
    assert done.returncode == 0, done.stderr
    key, pub = out / "operator.key", out / "operator.pub"
    assert key.exists() and pub.exists() and (key.stat().st_mode & 0o077) == 0, done.stdout
    return OperatorKey(str(key), str(pub))


class BoardDirs:
    """A board's directories in short paths (the control and notify sockets must fit 107 bytes), removed at
    the end: state, runtime, trust (with the operator's public key) and the config file."""

    def __init__(self, broker: Broker, operator: OperatorKey, extra: str = ""):
        self.root = H.short_dir("fn-e2e-")
        self.state = os.path.join(self.root, "state")
        self.run = os.path.join(self.root, "run")
        self.trust = os.path.join(self.root, "trust")
        os.makedirs(self.trust)
        shutil.copy(operator.pub, os.path.join(self.trust, "operator.pub"))
        self.config = H.write_config(os.path.join(self.root, "fieldnode.toml"), state_dir=self.state,
                                     runtime_dir=self.run, broker_url=broker.url, trust_dir=self.trust, extra=extra)
        self.notify_path = os.path.join(self.root, "notify")

    def log(self, name: str) -> str:
        return os.path.join(self.root, f"{name}.log")

    def remove(self) -> None:
        H.remove_tree(self.root)


@pytest.fixture
def board_dirs(e2e_broker: Broker, operator_key: OperatorKey) -> Iterator:
    """A factory of fresh board directories on a broker: ``board_dirs(broker=None, extra="")``."""
    made: list[BoardDirs] = []

    def make(broker: Broker | None = None, extra: str = "") -> BoardDirs:
        d = BoardDirs(broker or e2e_broker, operator_key, extra)
        made.append(d)
        return d

    yield make
    for d in made:
        d.remove()


@dataclass
class Board:
    """The shared board: its directories, the notify listener, the running agent and a client that subscribed
    to all of its topics before the agent started."""

    dirs: BoardDirs
    notify: H.NotifyListener
    agent: H.AgentProcess
    watcher: MqttTestClient
    broker: Broker
    operator: OperatorKey


@pytest.fixture(scope="session")
def board(e2e_broker: Broker, operator_key: OperatorKey) -> Iterator[Board]:
    """One ``fieldnode run --log-format json`` on a simulated board, READY, shared by the checks that leave it as
    they found it (a variant pinned is unpinned, a hung worker resumed, a changed config restored)."""
    dirs = BoardDirs(e2e_broker, operator_key)
    watcher = MqttTestClient(e2e_broker, client_id="e2e-watcher")
    watcher.connect()
    watcher.subscribe(f"{H.PREFIX}/#")
    notify = H.NotifyListener(dirs.notify_path)
    # --log-format json on the command line: a reload must keep what the command line chose over the file.
    agent = H.AgentProcess(dirs.config, notify, dirs.log("agent"), args=("--log-format", "json"))
    try:
        agent.ready()
        yield Board(dirs, notify, agent, watcher, e2e_broker, operator_key)
        if agent.alive:
            agent.signal(signal.SIGTERM)
            agent.wait()
    finally:
        agent.kill()
        watcher.close()
        notify.close()
        dirs.remove()


@pytest.fixture
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A plain mosquitto of one test's own, which it may stop and start again (same port)."""
    yield from run_broker(tmp_path_factory, "plain", None)
