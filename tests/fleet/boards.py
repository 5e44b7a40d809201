"""Boards for the fleet tools' tests: the board's real protocol code (link, dispatcher, verifier, groups, session
counter) with a fleet summary in its birth, in this process or in a child process that a test can SIGKILL.

``python -m tests.fleet.boards URL ROOT ID GROUPS TRUST`` runs one board (GROUPS comma-separated), prints ``ready``
once connected, and runs until killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from device.link.client import Link
from device.link.commands import Dispatcher, Registry, register_builtin
from device.link.envelope import TrustStore, Verifier
from device.link.groups import Groups
from device.link.spool.spool import Spool

ROOT = Path(__file__).resolve().parents[2]


def key_pair(directory: Path, name: str) -> Path:
    """Writes ``NAME.key`` (private, 0600) and ``trust/NAME.pub`` under ``directory``; returns the key's path."""
    private = ed25519.Ed25519PrivateKey.generate()
    path = directory / f"{name}.key"
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    path.chmod(0o600)
    (directory / "trust").mkdir(exist_ok=True)
    (directory / "trust" / f"{name}.pub").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


class Board:
    """One board: real link, command dispatcher, verifier and groups; its birth says a model, update state and
    level as an agent's does (and its groups, unless ``lists_groups`` is False: an agent from before groups)."""

    def __init__(self, url: str, root: Path, device_id: str, groups: list[str], trust: Path, *,
                 model: tuple[str, str] = ("vibration", "1.0.0"), update: str = "idle", level: str = "balanced",
                 faults: tuple[str, ...] = (), lists_groups: bool = True) -> None:
        d = root / device_id
        d.mkdir(parents=True, exist_ok=True)
        self.id = device_id
        self.groups = Groups(groups, str(d / "groups.json"))
        reg = Registry()
        register_builtin(reg, version="test")
        self.verifier = Verifier(TrustStore(str(trust)), device_id=device_id, groups=self.groups,
                                 nonce_path=str(d / "nonces.json"))
        self.dispatcher = Dispatcher(reg, verifier=self.verifier, device=device_id)
        self.spool = Spool(str(d / "spool.db"), commit_interval_s=0.02)
        self.spool.start()

        def birth() -> dict:
            return {"version": "0.1.0", "models": {model[0]: {"version": model[1], "variants": ["full", "lite"]}},
                    "variant": "lite", "update": {"state": update}, "level": level, "faults": list(faults),
                    **({"groups": list(self.groups.current)} if lists_groups else {})}

        self.link = Link(url, device_id, self.spool, backoff=(0.05, 0.2), dispatcher=self.dispatcher, birth=birth,
                         session_path=str(d / "session.json"), groups=self.groups)
        self.link.start()
        assert self.link.wait_connected(10), f"{device_id} did not connect"

    def close(self) -> None:
        """A clean stop: the link publishes ``offline``."""
        self.link.stop()
        self.spool.close()


class ChildBoard:
    """A :class:`Board` in a child process, for a kill -9 (the broker then publishes its will, ``lost``)."""

    def __init__(self, url: str, root: Path, device_id: str, groups: list[str], trust: Path) -> None:
        self.id = device_id
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fleet.boards", url, str(root), device_id,
                                      ",".join(groups), str(trust)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"{device_id}: {line!r}"

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def main(argv: list[str]) -> None:
    url, root, device_id, groups, trust = argv
    Board(url, Path(root), device_id, [g for g in groups.split(",") if g], Path(trust))
    print("ready", flush=True)
    signal.pause()


if __name__ == "__main__":
    main(sys.argv[1:])
