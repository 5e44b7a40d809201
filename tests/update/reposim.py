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
    from device.cli import main

    capsys.readouterr()
    rc = main(["repo", *argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, (rc, out, err)
    return json.loads(out)


def repo_error(capsys, *argv: str) -> dict:
    """Runs ``fieldnode repo ARGV --json`` expecting a failure; returns the error object (asserts exit 1, one
    stderr line, no traceback)."""
    from device.cli import main

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
    from tools.repo_release import grant_path

    with open(os.path.join(repo_dir, *grant_path(release, device_id).split("/")), "rb") as fh:
        release_identity = age.decrypt_bytes(fh.read(), [board_identity]).decode().strip()
    out = io.BytesIO()
    age.decrypt(io.BytesIO(ciphertext), out, [release_identity])
    return out.getvalue()
