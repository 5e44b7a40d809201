"""Test helpers for repositories made by ``fieldnode repo``: run the tool, read the result with python-tuf's client.

The judge of what the tool writes is python-tuf's own ``ngclient.Updater``, fed by :class:`DirFetcher`, which
serves a repository directory under a fixed base URL and answers a missing file with HTTP 404 (what ends the
client's walk of ``N+1.root.json``; any other error would not).
"""

from __future__ import annotations

import io
import json
import os
import urllib.parse

from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

BASE = "https://repo.invalid/"


class DirFetcher(FetcherInterface):
    """Serves ``root`` at :data:`BASE`; records each path fetched."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.fetched: list = []

    def _fetch(self, url: str):
        if not url.startswith(BASE):
            raise DownloadHTTPError(f"{url}: not under {BASE}", 404)
        relative = urllib.parse.unquote(url[len(BASE):])
        path = os.path.realpath(os.path.join(self.root, relative))
        if not path.startswith(self.root + os.sep):
            raise DownloadHTTPError(f"{relative}: outside the repository", 404)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, IsADirectoryError):
            raise DownloadHTTPError(f"{relative}: not found", 404) from None
        self.fetched.append(relative)
        return iter([data])


def updater(repo_dir: str, client_dir: str, *, bootstrap: bytes | None = None, fresh: bool = True) -> Updater:
    """A client of ``repo_dir`` keeping its state in ``client_dir``.

    Args:
        repo_dir: The repository (or an export) to serve.
        client_dir: The client's metadata and targets directory.
        bootstrap: The trusted root; default the repository's ``1.root.json`` when ``fresh``, else the root the
            client already trusts (its cached ``root.json``).
        fresh: Whether the client starts from the repository's first root.
    """
    if bootstrap is None and fresh:
        with open(os.path.join(repo_dir, "metadata", "1.root.json"), "rb") as fh:
            bootstrap = fh.read()
    os.makedirs(os.path.join(client_dir, "metadata"), exist_ok=True)
    return Updater(os.path.join(client_dir, "metadata"), BASE + "metadata/", os.path.join(client_dir, "targets"),
                   BASE + "targets/", fetcher=DirFetcher(repo_dir), bootstrap=bootstrap)


def repo(capsys, *argv: str) -> dict:
    """Runs ``fieldnode repo ARGV --json`` in this process; returns the printed object (asserts exit 0)."""
    from tools.cli import main

    capsys.readouterr()
    rc = main(["repo", *argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, (rc, out, err)
    return json.loads(out)


def repo_error(capsys, *argv: str) -> dict:
    """Runs ``fieldnode repo ARGV --json`` expecting a failure; returns the error object (asserts exit 1, one
    stderr line, no traceback)."""
    from tools.cli import main

    capsys.readouterr()
    rc = main(["repo", *argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 1, (rc, out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    doc = json.loads(out)
    assert doc["ok"] is False
    return doc["error"]


def open_release(repo_dir: str, release: str, device_id: str, board_identity: str, ciphertext: bytes) -> bytes:
    """What a board does after TUF verified the ciphertext: open its grant, then decrypt with the release key."""
    from device.update import age
    from tools.repo.release import grant_path

    with open(os.path.join(repo_dir, *grant_path(release, device_id).split("/")), "rb") as fh:
        release_identity = age.decrypt_bytes(fh.read(), [board_identity]).decode().strip()
    out = io.BytesIO()
    age.decrypt(io.BytesIO(ciphertext), out, [release_identity])
    return out.getvalue()


def resign_targets(repo_dir: str, edit, now=None) -> dict:
    """Publishes a new targets version with ``edit(targets_signed)`` applied, signed by the repository's own targets
    keys: how a targets key holder (or a bug in the tool) signs whatever facts it likes. Returns publish's result."""
    import copy

    from tools.repo import keys as repo_keys
    from tools.repo.meta import Repository
    from tools.repo.publish import publish

    r = Repository(repo_dir)
    with r.lock():
        md = copy.deepcopy(r.current("targets"))
        md.signed.version = r.published("targets").signed.version + 1
        edit(md.signed)
        r.sign(md, "targets", repo_keys.load_signers(r.offline_keys), [r.current("root").signed],
               where=r.offline_keys)
        r.stage(md)
    return publish(Repository(repo_dir), now=now)


def publish_at(repo_dir: str, now, **kw) -> dict:
    """``fieldnode repo publish`` with the signing time ``now`` (a datetime): expiry counts from it."""
    from tools.repo.meta import Repository
    from tools.repo.publish import publish

    return publish(Repository(repo_dir), now=now, **kw)


class BoardClock:
    """Wall-clock time a test sets (``t``); sleeps are only recorded."""

    def __init__(self, t: float) -> None:
        self.t = t
        self.slept: list = []

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return 0.0

    def sleep(self, s: float) -> None:
        self.slept.append(s)


class World:
    """A published repository made with ``fieldnode repo`` and the boards that read it (tests/update/test_client*).

    ``vibration/full`` version 3 (hardware class rpi4, ring stable, minimum agent 0.1.0, with test vectors) is
    granted to ``board-a`` (identity ``board``) and ``board-b`` (``other``), then published.

    Attributes:
        path: The repository. release: The release id. model, vectors: The plaintexts. board, other:
            ``(identity, recipient)`` of board-a and board-b. tmp: The test's tmp_path.
    """

    PATH = "models/vibration/full/3.tflite.age"

    def __init__(self, tmp_path, capsys, *init_args: str) -> None:
        self.tmp = tmp_path
        self.path = str(tmp_path / "repo")
        self.model = os.urandom(150_000)  # two full age chunks and a partial one
        self.vectors = os.urandom(5_000)
        model, vectors = tmp_path / "model.tflite", tmp_path / "vectors.npz"
        model.write_bytes(self.model)
        vectors.write_bytes(self.vectors)
        repo(capsys, "init", self.path, *init_args)
        self.release = repo(capsys, "add-model", self.path, "--model", str(model), "--name", "vibration",
                            "--variant", "full", "--version", "3", "--hwclass", "rpi4", "--min-agent", "0.1.0",
                            "--test-vectors", str(vectors))["release"]
        from device.update import age

        self.board, self.other = age.generate_identity(), age.generate_identity()
        fleet = tmp_path / "fleet.txt"
        fleet.write_text(f"board-a {self.board[1]}\nboard-b {self.other[1]}\n")
        repo(capsys, "grant", self.path, "--recipients-file", str(fleet), "--release", self.release)
        repo(capsys, "publish", self.path)
        with open(self.file("metadata/1.root.json"), "rb") as fh:
            self.root = fh.read()  # what a board is provisioned with

    def file(self, relative: str) -> str:
        """A file of the repository, by its ``/``-separated relative path."""
        return os.path.join(self.path, *relative.split("/"))

    def stored_target(self, target_path: str) -> str:
        """The stored (consistent-snapshot, ``<sha256>.<name>``) file of a target."""
        directory, _, base = target_path.rpartition("/")
        folder = self.file(f"targets/{directory}")
        (found,) = [n for n in os.listdir(folder) if n.endswith("." + base) and len(n) == 65 + len(base)]
        return os.path.join(folder, found)

    def client(self, name: str = "board", base: str | None = None, **kw):
        """A board's ``device.update.client.Repository`` keeping its state in ``tmp/name``; ``base`` is an http(s)
        URL serving the repository directory (default: the directory itself through ``file://`` URLs)."""
        import pathlib
        import time

        from device.update.client import Repository

        if base is None:
            base = pathlib.Path(self.path).as_uri() + "/"
        kw.setdefault("clock", BoardClock(time.time()))
        kw.setdefault("attempts", 2)
        return Repository(os.path.join(str(self.tmp), name, "metadata"), root=self.root,
                          metadata_url=base + "metadata/", targets_url=base + "targets/", grants_url=base + "grants/",
                          **kw)


def run_repo(*argv: str) -> dict:
    """``fieldnode repo ARGV --json`` in this process without capsys (for module-scoped fixtures); returns the
    printed object (asserts exit 0)."""
    import contextlib

    from tools.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["repo", *argv, "--json"])
    assert rc == 0, (rc, out.getvalue())
    return json.loads(out.getvalue())


def model_repo(path: str, versions: dict, boards: dict, *, hwclass=("rpi4",), name: str = "vibration") -> bytes:
    """A published repository of whole model versions, made with ``fieldnode repo`` (the installer's tests).

    Args:
        path: The new repository's directory.
        versions: ``{version: {variant: (model file, test-vectors file or None)}}``, added in version order.
        boards: ``{device id: age recipient}``; every version is granted to every board.
        hwclass: The hardware classes of every release.
        name: The model name.

    Returns:
        The trusted root a board is provisioned with (``metadata/1.root.json``).
    """
    run_repo("init", path)
    for version in sorted(versions):
        for variant, (model, vectors) in versions[version].items():
            extra = ["--test-vectors", vectors] if vectors else []
            run_repo("add-model", path, "--model", model, "--name", name, "--variant", variant, "--version",
                     str(version), "--hwclass", *hwclass, *extra)
        for device, recipient in boards.items():
            run_repo("grant", path, "--device", device, "--recipient", recipient, "--name", name, "--version",
                     str(version))
    run_repo("publish", path)
    with open(os.path.join(path, "metadata", "1.root.json"), "rb") as fh:
        return fh.read()


def distinct_release(out_dir: str, tag: str) -> dict:
    """The shipped vibration model's variants and test vectors, with bytes of their own for ``tag``.

    For repositories whose versions must differ byte for byte yet all pass validation (the install crash tests
    tell the old model from the new one by their bytes): each ``.tflite`` is the shipped one with ``tag``
    appended after the FlatBuffer (the interpreter reads from the buffer's root offset and ignores what
    trails it), and the vectors are the shipped arrays plus a ``release`` array holding ``tag``.

    Args:
        out_dir: A new directory for the files.
        tag: What makes this release's bytes its own (a version, say).

    Returns:
        ``{"full": (model file, test-vectors file), "lite": (...)}``, as :func:`model_repo` takes them.
    """
    import numpy as np

    from device.runtime.manifest import bundled_model_dir

    shipped = bundled_model_dir()
    os.makedirs(out_dir)
    vectors = os.path.join(out_dir, "vibration_testvectors.npz")
    with np.load(os.path.join(shipped, "vibration_testvectors.npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(vectors, release=np.array(tag), **arrays)
    out = {}
    for variant in ("full", "lite"):
        name = f"vibration_{variant}.tflite"
        with open(os.path.join(shipped, name), "rb") as fh:
            data = fh.read()
        with open(os.path.join(out_dir, name), "wb") as fh:
            fh.write(data + b"\0" * 64 + f"fieldnode release {tag}".encode())
        out[variant] = (os.path.join(out_dir, name), vectors)
    return out
