"""The sysfs seam: every read and write of /sys, /proc and /dev goes through a :class:`Sysfs` root.

The root defaults to ``/``. Pointing it at a directory (config ``drivers.sysfs_root`` or the environment
variable ``FIELDNODE_SYSFS_ROOT``) makes every driver read and write that tree instead: the virtual board
writes a live fake tree there, and a technician can point the agent at a copy of a real board's tree.
Paths given to :class:`Sysfs` are relative to the root (``"sys/class/thermal"``), so drivers never build
absolute paths of their own.

A node that does not exist is "unknown" (``None``), never an error: boards differ in what they expose.
"""

from __future__ import annotations

import errno
import glob as _glob
import logging
import os
import re
from typing import Mapping

from drivers.errors import SysfsError, SysfsPermissionError

ENV_ROOT = "FIELDNODE_SYSFS_ROOT"

log = logging.getLogger(__name__)


def resolve_root(configured: str = "", environ: Mapping[str, str] | None = None) -> str:
    """Picks the sysfs root: ``FIELDNODE_SYSFS_ROOT``, else the configured value, else ``/``."""
    env = os.environ if environ is None else environ
    return env.get(ENV_ROOT) or configured or "/"


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class Sysfs:
    """Reads and writes nodes under a root directory.

    Args:
        root: The directory that stands for ``/``.
    """

    def __init__(self, root: str = "/"):
        self.root = os.path.abspath(root)

    def __repr__(self) -> str:
        return f"Sysfs({self.root!r})"

    def path(self, rel: str) -> str:
        """The real path of ``rel`` (relative to the root; a leading ``/`` is ignored)."""
        return os.path.join(self.root, rel.lstrip("/"))

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel))

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching ``pattern``, in natural order (``zone2`` before ``zone10``)."""
        base = self.root.rstrip(os.sep) + os.sep
        found = [p[len(base):] if p.startswith(base) else p for p in _glob.glob(self.path(pattern))]
        return sorted(found, key=_natural_key)

    def read_text(self, rel: str) -> str | None:
        """The stripped text of a node, or ``None`` when it does not exist or cannot be read.

        Raises:
            SysfsError: The node exists but reading it failed for another reason than absence or
                permission (for example EIO from a driver).
        """
        try:
            with open(self.path(rel), "rb") as f:
                data = f.read(65536)
        except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENXIO, errno.EAGAIN, errno.ENODATA, errno.EINVAL):
                return None  # a node whose driver has nothing to say right now (battery absent, ...)
            raise SysfsError(f"cannot read: {exc.strerror or exc}", rel) from exc
        return data.decode("utf-8", "replace").strip()

    def read_int(self, rel: str) -> int | None:
        """The node as an integer (decimal, or hex with ``0x``), or ``None`` when absent or not a number."""
        text = self.read_text(rel)
        if text is None:
            return None
        try:
            return int(text, 0)
        except ValueError:
            return None

    def read_optional(self, rel: str) -> str | None:
        """Like :meth:`read_text` for readings that may be missing: a node that cannot be read (EIO from a
        fuel gauge on a flaky I2C bus, a sensor driver failing) is unknown too, and an empty one is ``None``.
        One bad node must never hide the others from the governor."""
        try:
            text = self.read_text(rel)
        except SysfsError as exc:
            log.debug("sysfs node unreadable, treated as unknown: %s", exc)
            return None
        return text or None

    def read_optional_int(self, rel: str) -> int | None:
        """:meth:`read_optional` as an integer (decimal, or hex with ``0x``); ``None`` when not a number."""
        text = self.read_optional(rel)
        if text is None:
            return None
        try:
            return int(text, 16) if text[:2].lower() == "0x" else int(text)  # "050" is decimal, not an error
        except ValueError:
            log.debug("%s holds %r, expected an integer; treated as unknown", rel, text)
            return None

    def write_text(self, rel: str, value: object) -> None:
        """Writes ``value`` to an existing node, the way sysfs expects (one write, no temp file).

        Raises:
            SysfsPermissionError: Writing was refused (EACCES/EPERM or a read-only file system).
            SysfsError: The node does not exist or the kernel rejected the value.
        """
        path = self.path(rel)
        data = f"{value}\n".encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # what `echo value > node` does
        except PermissionError as exc:
            raise SysfsPermissionError("permission denied", rel) from exc
        except FileNotFoundError as exc:
            raise SysfsError("no such node", rel) from exc
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise SysfsPermissionError("read-only file system", rel) from exc
            raise SysfsError(f"cannot open for writing: {exc.strerror or exc}", rel) from exc
        try:
            os.write(fd, data)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise SysfsPermissionError("permission denied", rel) from exc
            raise SysfsError(f"write of {str(value)!r} rejected: {exc.strerror or exc}", rel) from exc
        finally:
            os.close(fd)
