"""The files ``fieldnode install`` puts on a board besides the venv: systemd's, udev's and the default config.

The unit, sysusers, tmpfiles and udev files ship in the wheel as package data (``device/data/systemd/``, copied
from the checkout's ``systemd/`` when the wheel is built); run from a checkout, they are read from ``systemd/``
itself. Every write goes through the one atomic writer (temporary file in the same directory, fsync,
``os.replace``, directory fsync), so a power cut while flashing leaves the old file or the new one. Nothing here
runs a program.
"""

from __future__ import annotations

import os
import re
import textwrap

from device.statefile import write_atomic

UNIT_NAME = "fieldnode.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
SYSUSERS_PATH = "/usr/lib/sysusers.d/fieldnode.conf"
TMPFILES_PATH = "/usr/lib/tmpfiles.d/fieldnode.conf"
UDEV_PATH = "/etc/udev/rules.d/99-fieldnode-edgetpu.rules"
CONFIG_PATH = "/etc/fieldnode/fieldnode.toml"
# (file in systemd/, where it goes on the board)
SHIPPED = (("fieldnode.service", UNIT_PATH), ("fieldnode.sysusers", SYSUSERS_PATH),
           ("fieldnode.tmpfiles", TMPFILES_PATH), ("99-fieldnode-edgetpu.rules", UDEV_PATH))
UNIT_PREFIX = "/opt/fieldnode"  # what the shipped unit's ExecStart names
SAFE_PATH = re.compile(r"[A-Za-z0-9._/-]+")  # no quoting needed in a unit file or a shell line


def source_dir() -> str:
    """The directory holding the shipped systemd files: the wheel's package data, else the checkout's."""
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # beside tools/
    for candidate in (os.path.join(top, "device", "data", "systemd"), os.path.join(top, "systemd")):
        if all(os.path.isfile(os.path.join(candidate, name)) for name, _ in SHIPPED):
            return candidate
    raise FileNotFoundError(f"the systemd unit files are missing from this installation (looked in "
                            f"device/data/systemd and systemd/ beside {top})")


def unit_text(prefix: str, text: str) -> str:
    """The shipped unit with its venv under ``prefix`` instead of the default one."""
    return text.replace(f"{UNIT_PREFIX}/venv/", f"{prefix.rstrip('/')}/venv/")


def commented_config() -> str:
    """The default config as a file that documents itself: each key commented out at its default with its doc.

    Tables stay uncommented, so uncommenting one key is enough to set it; as it is, the file loads as the
    defaults.
    """
    from device import __version__, config

    out = [f"# fieldnode {__version__} configuration, written by `fieldnode install` (it never overwrites it).",
           "# Every key is shown commented out at its default. Uncomment a line to change it, then check the file",
           "# with `fieldnode config check` and apply it with `systemctl reload fieldnode` (or restart).",
           "# `fieldnode config keys` lists the keys; `fieldnode config show` prints what is in effect.", ""]
    table = None
    for key_path, type_text, default, doc in config.describe():
        head, _, name = key_path.rpartition(".")
        if head != table:
            out.append(("\n" if table else "") + f"[{head}]")
            table = head
        out.extend(textwrap.wrap(f"{doc} ({type_text})", width=110, initial_indent="# ", subsequent_indent="# ",
                                 break_on_hyphens=False, break_long_words=False))
        out.append(f"#{name} = {config.toml_literal(default)}")
    return "\n".join(out) + "\n"


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Writes ``path`` with the one atomic writer (:func:`device.statefile.write_atomic`: temporary file in its
    directory, fsync, ``os.replace``, directory fsync; ``mode`` whatever the umask). Missing directories are made
    0755, as a board's ``/etc`` and ``/usr`` directories are."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    write_atomic(path, data, mode)


def atomic_copy(src: str, dest: str, mode: int = 0o644) -> None:
    with open(src, "rb") as fh:
        atomic_write(dest, fh.read(), mode)


class OutsideRoot(ValueError):
    """A path that, in an image root, leads out of it (an absolute symlink in the image, or ``..``)."""


def host_path(root: str, board_path: str, *, link: bool = False) -> str:
    """``board_path`` as it is on this machine under ``root``, refused when it resolves outside ``root``: an
    absolute symlink inside a mounted image points at this machine's own files, and must never be written
    through. With ``link``, the path is a symlink we make (it may point anywhere on the board): its directory is
    what must stay inside."""
    path = os.path.join(root, board_path.lstrip("/"))
    if root == "/":
        return path
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)) if link \
        else os.path.realpath(path)
    top = os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise OutsideRoot(f"{board_path} resolves to {real}, outside the image root {root} (an absolute symlink in "
                          f"the image?); refusing to write to this machine's files")
    return path


def _put(root: str, board_path: str, data: bytes, mode: int = 0o644) -> dict:
    path = host_path(root, board_path)
    try:
        with open(path, "rb") as fh:
            same = fh.read() == data and os.stat(path).st_mode & 0o7777 == mode
    except OSError:
        same = False
    if not same:
        atomic_write(path, data, mode)
    return {"path": board_path, "action": "unchanged" if same else "written", "mode": f"{mode:04o}"}


def write_system_files(root: str, prefix: str) -> list[dict]:
    """Writes the unit (for ``prefix``), sysusers, tmpfiles and udev files, and the config when there is none.

    Args:
        root: The board's ``/`` on this machine.
        prefix: Where the venv is, as the board sees it.

    Returns:
        One ``{"path", "action", "mode"}`` per file, action ``written``, ``unchanged`` or ``kept`` (the config).
    """
    src = source_dir()
    done = []
    for name, board_path in SHIPPED:
        with open(os.path.join(src, name), encoding="utf-8") as fh:
            text = fh.read()
        if board_path == UNIT_PATH:
            text = unit_text(prefix, text)
        done.append(_put(root, board_path, text.encode("utf-8")))
    config_path = os.path.join(root, CONFIG_PATH.lstrip("/"))
    if os.path.lexists(config_path):
        done.append({"path": CONFIG_PATH, "action": "kept", "mode": f"{os.lstat(config_path).st_mode & 0o7777:04o}"})
    else:
        # Root's, readable by the agent's account: the config holds paths, never a secret (keys are files of
        # their own, mode 0600).
        done.append(_put(root, CONFIG_PATH, commented_config().encode("utf-8")))
    return done


def wanted_by(unit_text_: str) -> list[str]:
    """The targets of the unit's ``[Install] WantedBy=`` lines."""
    targets, section = [], None
    for line in unit_text_.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Install]" and line.startswith("WantedBy="):
            targets.extend(line.split("=", 1)[1].split())
    return targets


def enable(root: str, unit: str) -> list[str]:
    """Enables ``unit`` as ``systemctl --root=ROOT enable`` does: a ``TARGET.wants/UNIT`` symlink to the unit's
    absolute path on the board, for each ``WantedBy=`` target.

    Returns:
        The ``.wants`` directories that now hold the link.
    """
    unit_path = f"/etc/systemd/system/{unit}"
    with open(host_path(root, unit_path), encoding="utf-8") as fh:
        targets = wanted_by(fh.read())
    done = []
    for target in targets:
        link = host_path(root, f"/etc/systemd/system/{target}.wants/{unit}", link=True)
        os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
        if not (os.path.islink(link) and os.readlink(link) == unit_path):
            tmp = f"{link}.tmp{os.getpid()}"
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(unit_path, tmp)
            os.replace(tmp, link)
        done.append(f"{target}.wants")
    return done


COMMAND_LINK = "/usr/local/bin/fieldnode"


def link_command(root: str, prefix: str) -> str:
    """Links ``/usr/local/bin/fieldnode`` to the venv's entry point, so a technician types ``fieldnode status`` and
    ``sudo fieldnode diag`` on the board. An existing file there that is not our link is left alone.

    Returns:
        ``linked``, ``unchanged`` or ``kept`` (something else is there).
    """
    target = f"{prefix.rstrip('/')}/venv/bin/fieldnode"
    link = host_path(root, COMMAND_LINK, link=True)
    if os.path.islink(link) and os.readlink(link) == target:
        return "unchanged"
    if os.path.lexists(link) and not os.path.islink(link):
        return "kept"
    os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
    tmp = f"{link}.tmp{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    return "linked"
