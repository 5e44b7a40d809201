"""``fieldnode install``: put the agent on a board, or into a board's image before its first boot.

What it writes, under ROOT (``/``, or ``--root DIR``, a mounted image root) and PREFIX (``/opt/fieldnode``):

* ``PREFIX/venv``: a venv made with ``--system-site-packages`` (apt's ``python3-libgpiod`` and the Edge TPU
  runtime stay visible) by the target's own Python, and the wheel pip-installed into it, not editable.
* ``PREFIX/wheels/<wheel>``: the installed wheel, so ``fieldnode install`` run again on the board finds it.
* ``/etc/systemd/system/fieldnode.service`` (its ``ExecStart`` names PREFIX), enabled: the
  ``multi-user.target.wants`` symlink ``systemctl enable`` makes.
* ``/usr/lib/sysusers.d/fieldnode.conf``, ``/usr/lib/tmpfiles.d/fieldnode.conf``,
  ``/etc/udev/rules.d/99-fieldnode-edgetpu.rules``.
* ``/etc/fieldnode/fieldnode.toml``: every key commented out at its default with its doc, written only when no
  config exists (an existing one is never touched).

With ``--root`` the venv is made and pip runs *inside* the root (``chroot DIR``), so the venv's paths and
shebangs are the ones the board will see and its Python is the board's (an arm64 root on an x86_64 machine runs
through qemu-user's binfmt handler). That needs root and a ``python3`` with ``venv`` in the image. The host is
not touched: no user is created on it, no unit reloaded. Re-running upgrades the wheel and keeps the config.
The unit-file helpers (writing, enabling, the commented config) are in :mod:`tools.install.files`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

from device.errors import Exit, FieldnodeError
from tools.install import files

DEFAULT_PREFIX = "/opt/fieldnode"
DEFAULT_PYTHON = "/usr/bin/python3"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Variables of the calling environment that would make the target's Python import the wrong code.
DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")


class InstallError(FieldnodeError):
    """The install cannot go on; ``code`` says which part (root, privileges, python, wheel, pip)."""

    code = "install_failed"
    codes = ("install_failed", "install_root", "install_needs_root", "install_python", "install_wheel",
             "install_pip", "install_users", "install_apply")  # the parts an instance's code names

    def __init__(self, message: str, code: str = "install_failed"):
        super().__init__(message)
        self.code = code


def add_arguments(p) -> None:
    """Adds ``install``'s options.

    Args:
        p: The parser of the ``install`` subcommand.
    """
    p.add_argument("--root", metavar="DIR",
                   help="install into this mounted image root instead of this system (needs root: the venv is "
                        "made inside it with chroot)")
    p.add_argument("--wheel", metavar="FILE",
                   help="the fieldnode wheel to install (default: the wheel of this version, if one is found in "
                        "PREFIX/wheels or the checkout's dist/)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, metavar="DIR",
                   help=f"where the venv goes, as the board sees it (default {DEFAULT_PREFIX})")
    p.add_argument("--python", default=DEFAULT_PYTHON, metavar="PYTHON",
                   help=f"the board's interpreter that makes the venv, as the board sees it (default {DEFAULT_PYTHON}, "
                        f"the distribution's, whose apt packages the venv sees)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    """Installs; prints each thing done. Failures raise :class:`InstallError` (one line, exit 1).

    Returns:
        0.
    """
    import json

    if args.wheel is not None:  # a wrong file is said before anything about the root
        check_wheel(args.wheel)
    target = Target.from_args(args)
    wheel = find_wheel(args.wheel, target)
    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    say(f"installing {os.path.basename(wheel)} into {target.describe()}")
    try:
        report = install(target, wheel, say)
    except files.OutsideRoot as exc:
        raise InstallError(str(exc), "install_root") from exc
    if args.json:
        print(json.dumps(report))
    return Exit.OK


class Target:
    """Where the install goes: the root (``/`` or an image), the prefix and the board's Python, and how to run a
    command there (directly, or through ``chroot``)."""

    def __init__(self, root: str, prefix: str, python: str):
        self.root, self.prefix, self.python = root, prefix, python
        self.chroot = root != "/"

    @classmethod
    def from_args(cls, args) -> "Target":
        for name, value in (("--prefix", args.prefix), ("--python", args.python)):
            if not value.startswith("/") or not files.SAFE_PATH.fullmatch(value) \
                    or any(part in (".", "..") for part in value.split("/")):
                raise InstallError(f"{name} {value!r}: expected an absolute path of letters, digits and ._-/ "
                                   f"without . or .. parts", "install_usage")
        root = "/"
        if args.root is not None:
            root = os.path.realpath(args.root)
            if not os.path.isdir(root):
                raise InstallError(f"--root {args.root}: no such directory (mount the image's root file system "
                                   f"there first)", "install_root")
        if os.geteuid() != 0:
            how = "it runs the image's Python with chroot" if root != "/" else "it writes /etc and PREFIX"
            raise InstallError(f"needs root ({how}): run it with sudo", "install_needs_root")
        target = cls(root, args.prefix.rstrip("/") or "/", args.python)
        if not os.path.lexists(target.path(target.python)):
            where = f"the root {root}" if target.chroot else "this system"
            raise InstallError(f"{target.python} not found in {where}: install python3 and python3-venv there "
                               f"(or name the interpreter with --python)", "install_python")
        return target

    @property
    def venv(self) -> str:
        return f"{self.prefix}/venv"

    def path(self, board_path: str) -> str:
        """A path as the board sees it, as it is on this machine, to read (the image's own absolute symlinks, such as
        the venv's ``bin/python``, resolve on the board)."""
        return os.path.join(self.root, board_path.lstrip("/"))

    def writable(self, board_path: str) -> str:
        """:meth:`path` for a write: refused when it resolves outside the image root."""
        try:
            return files.host_path(self.root, board_path)
        except files.OutsideRoot as exc:
            raise InstallError(str(exc), "install_root") from exc

    def describe(self) -> str:
        return f"{self.venv}" + (f" in the root {self.root}" if self.chroot else "")

    def run(self, argv: list[str], what: str, code: str) -> str:
        """Runs a command on the target; its output, or :class:`InstallError` with its last error line."""
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        if self.chroot:
            env["PATH"] = CHROOT_PATH
            argv = [shutil.which("chroot") or "/usr/sbin/chroot", self.root] + argv
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, cwd="/")
        except OSError as exc:
            raise InstallError(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}", code) from exc
        if proc.returncode != 0:
            raise InstallError(f"{what} failed (exit {proc.returncode}): {_last_error(proc.stderr + proc.stdout)}",
                               code)
        return proc.stdout


# pip's lines that say *why* (a TLS verification failure, a proxy, a refused connection): its last ERROR line
# only says that nothing was found.
_CAUSES = ("Could not fetch URL", "WARNING: Retrying", "Could not install packages", "× ", "╰─>")
MAX_ERROR_CHARS = 1500


def _last_error(output: str) -> str:
    """What a failed command said, on one line: every error line, and before them the lines that give the cause
    (the last of each kind: pip repeats its retries), joined with `` | ``."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR", "Error", "error")) or "Error:" in line]
    causes: dict = {}
    for line in lines:
        kind = next((c for c in _CAUSES if line.startswith(c)), None)
        if kind is not None and line not in errors:
            causes[kind] = line  # the last one of each kind
    picked = [line for line in lines if line in causes.values() or line in errors]
    unique = list(dict.fromkeys(line[:500] for line in picked)) or (lines or ["no output"])[-1:]
    text = " | ".join(unique)
    return text if len(text) <= MAX_ERROR_CHARS else "... " + text[-MAX_ERROR_CHARS:]


def find_wheel(given: str | None, target: Target) -> str:
    """The wheel to install: ``--wheel``, else one of this very version (a previous install's copy in
    PREFIX/wheels, on the target or where this command runs from, or ``dist/`` of the checkout it runs from).

    Raises:
        InstallError: ``install_wheel``: the file is missing or is not a fieldnode wheel, or none was found.
    """
    from device import __version__

    if given is None:
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(files.__file__))))  # the checkout
        places = [target.path(f"{target.prefix}/wheels"), os.path.join(os.path.dirname(sys.prefix), "wheels"),
                  os.path.join(here, "dist")]
        found = [w for d in places for w in sorted(glob.glob(os.path.join(d, f"fieldnode-{__version__}-*.whl")))]
        if not found:
            raise InstallError(f"no wheel of fieldnode {__version__} found (looked in {', '.join(places)}): build "
                               f"one with `make wheel` and pass --wheel dist/fieldnode-{__version__}-py3-none-any.whl",
                               "install_wheel")
        given = found[0]
    return check_wheel(given)


def check_wheel(path: str) -> str:
    """The absolute path of a fieldnode wheel; :class:`InstallError` (``install_wheel``) for anything else."""
    if not os.path.isfile(path):
        raise InstallError(f"--wheel {path}: no such file", "install_wheel")
    name = os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as zf:
            has_metadata = any(n.startswith("fieldnode-") and n.endswith(".dist-info/METADATA") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise InstallError(f"--wheel {path}: not a wheel ({exc})", "install_wheel") from exc
    if not (name.startswith("fieldnode-") and name.endswith(".whl") and has_metadata):
        raise InstallError(f"--wheel {path}: not a fieldnode wheel (expected fieldnode-VERSION-py3-none-any.whl "
                           f"with its .dist-info)", "install_wheel")
    return os.path.abspath(path)


def install(target: Target, wheel: str, say) -> dict:
    """The whole install; each step reported through ``say(line)``.

    Returns:
        What was done: ``{"ok", "root", "prefix", "venv", "python", "wheel", "version", "venv_action", "files",
        "enabled", "command", "applied"}`` (``command``: the ``/usr/local/bin/fieldnode`` link); ``files`` lists ``{"path", "action", "mode"}`` (action written, unchanged or
        kept); ``applied`` what systemd's tools did now (``users``, ``tmpfiles``, ``reloaded``, ``udev``).
    """
    py_version = _python_version(target)
    venv_action = _make_venv(target, py_version)
    say(f"venv      {target.venv} ({venv_action}, Python {py_version})")
    version = _pip_install(target, wheel)
    say(f"wheel     fieldnode {version} installed ({os.path.basename(wheel)}, kept in {target.prefix}/wheels)")
    written = files.write_system_files(target.root, target.prefix)
    for entry in written:
        note = " (an existing config is never overwritten)" if entry["action"] == "kept" else ""
        say(f"{entry['action']:<9} {entry['path']} ({entry['mode']}){note}")
    enabled = files.enable(target.root, files.UNIT_NAME)
    say(f"enabled   {files.UNIT_NAME} ({', '.join(enabled)})")
    command = files.link_command(target.root, target.prefix)
    say(f"{command:<9} {files.COMMAND_LINK} -> {target.venv}/bin/fieldnode"
        + (" (a file that is not ours is there: left alone)" if command == "kept" else ""))
    applied = _apply_live(target, say) if not target.chroot else _sysusers_in_root(target, say)
    if not target.chroot:
        say("next: edit /etc/fieldnode/fieldnode.toml (the sensor, the broker), check it with "
            "`fieldnode config check`, then `systemctl restart fieldnode`")
    return {"ok": True, "root": target.root, "prefix": target.prefix, "venv": target.venv, "python": py_version,
            "wheel": os.path.basename(wheel), "version": version, "venv_action": venv_action, "files": written,
            "enabled": enabled, "command": command, "applied": applied}


def _python_version(target: Target) -> str:
    out = target.run([target.python, "-c", "import sys, venv, ensurepip; print('%d.%d.%d' % sys.version_info[:3])"],
                     f"{target.python} in {target.root}", "install_python")
    version = out.strip().splitlines()[-1] if out.strip() else "?"
    if tuple(int(x) for x in version.split(".")[:2]) < (3, 9):
        raise InstallError(f"{target.python} is Python {version}; fieldnode needs 3.9 or newer", "install_python")
    return version


def _make_venv(target: Target, py_version: str) -> str:
    """Makes the venv, or keeps the one there when it was made by the same Python (a different one, after a
    distribution upgrade, has its packages in another site-packages: it is made anew)."""
    cfg = target.path(f"{target.venv}/pyvenv.cfg")
    existing = {}
    try:
        with open(cfg, encoding="utf-8") as fh:
            existing = dict(line.split(" = ", 1) for line in fh.read().splitlines() if " = " in line)
    except OSError:
        pass
    if existing.get("version", existing.get("version_info", "")).strip() == py_version \
            and existing.get("include-system-site-packages", "").strip() == "true" \
            and os.path.exists(target.path(f"{target.venv}/bin/python")):
        return "kept"
    action = "made anew" if os.path.exists(cfg) else "created"
    if os.path.exists(cfg):
        shutil.rmtree(target.writable(target.venv))
    os.makedirs(target.writable(target.prefix), mode=0o755, exist_ok=True)
    target.run([target.python, "-m", "venv", "--system-site-packages", target.venv],
               f"making the venv {target.venv}", "install_python")
    return action


def _pip_install(target: Target, wheel: str) -> str:
    """pip-installs the wheel from a staging copy in PREFIX/wheels/.incoming; only once pip succeeded does it
    become the kept wheel (a wheel pip refuses never replaces the one that works)."""
    wheels = target.writable(f"{target.prefix}/wheels")
    staging = os.path.join(wheels, ".incoming")
    name = os.path.basename(wheel)
    kept = os.path.join(wheels, name)
    if os.path.abspath(wheel) != os.path.abspath(kept):
        shutil.rmtree(staging, ignore_errors=True)
        files.atomic_copy(wheel, os.path.join(staging, name))
        on_board = f"{target.prefix}/wheels/.incoming/{name}"
    else:  # re-installing the kept wheel itself (`fieldnode install` with no --wheel on the board)
        on_board = f"{target.prefix}/wheels/{name}"
    pip = [f"{target.venv}/bin/python", "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    # First the wheel with its dependencies (nothing changes if a step fails), then the exact files of this
    # wheel: pip leaves an installed copy of the same version alone, and a rebuilt wheel must replace it.
    staged = on_board.startswith(f"{target.prefix}/wheels/.incoming/")
    try:
        target.run(pip + [on_board], f"pip install {name}", "install_pip")
        target.run(pip + ["--no-deps", "--force-reinstall", on_board], f"pip install {name}", "install_pip")
    except InstallError:
        if staged:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if staged:
        os.replace(target.writable(on_board), kept)
        shutil.rmtree(staging, ignore_errors=True)
    for old in glob.glob(os.path.join(wheels, "fieldnode-*.whl")):
        if os.path.basename(old) != name:
            os.unlink(old)
    out = target.run([f"{target.venv}/bin/python", "-c",
                      "import importlib.metadata as m; print(m.version('fieldnode'))"],
                     "checking the installed wheel", "install_pip")
    return out.strip()


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")


def _sysusers_in_root(target: Target, say) -> list[str]:
    """Creates the account in the image now (first boot would too), so files can be given to it before boot."""
    tool = _tool("systemd-sysusers")
    if not tool:
        say("users     not created now: no systemd-sysusers here; systemd-sysusers.service does it at first boot")
        return []
    conf = target.path(files.SYSUSERS_PATH)
    proc = subprocess.run([tool, f"--root={target.root}", conf], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InstallError(f"systemd-sysusers --root={target.root} failed: {_last_error(proc.stderr)}",
                           "install_users")
    say("users     fieldnode (systemd-sysusers --root)")
    return ["users"]


def booted_with_systemd() -> bool:
    """True on a system systemd booted (sd_booted(3)'s test); false in a chroot (an image being built, as
    pi-gen's stages run) or a container without systemd, where boot applies what install wrote."""
    return os.path.isdir("/run/systemd/system")


def _apply_live(target: Target, say) -> list[str]:
    """On the running system: the account, the cpufreq permissions and the unit are applied now. Inside a
    chroot only the account is: ``/sys`` there is the build machine's, and the board's boot applies the rest."""
    done = []
    steps = [("systemd-sysusers", [files.SYSUSERS_PATH], "users")]
    if booted_with_systemd():
        steps += [("systemd-tmpfiles", ["--create", files.TMPFILES_PATH], "tmpfiles"),
                  ("systemctl", ["daemon-reload"], "reloaded")]
        if os.path.exists("/run/udev/control"):
            steps.append(("udevadm", ["control", "--reload"], "udev"))
    else:
        say("boot      not a system booted by systemd (a chroot?): tmpfiles and udev act at the board's boot")
    for name, argv, label in steps:
        tool = _tool(name)
        if not tool:
            say(f"{label:<9} skipped: {name} is not installed")
            continue
        proc = subprocess.run([tool] + argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise InstallError(f"{name} {' '.join(argv)} failed: {_last_error(proc.stderr)}", "install_apply")
        say(f"{label:<9} {name} {' '.join(argv)}")
        done.append(label)
    return done
