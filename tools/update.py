"""``fieldnode update``: model updates on this board, from the configured repository (``[update]``).

Actions (docs/updates.md, "Installing"):

* ``check``: refreshes the signed metadata and says what ``install`` would install, and why newer releases are
  refused.
* ``install [--version N] [--force]``: the whole pipeline (device/update/install.py); the new model serves on
  trial. ``--force`` installs even when the board would defer (low battery, hot SoC, governor in its lowest
  levels).
* ``status``: what serves, the fallback, the floors, the failed versions, the trusted root's version and the
  last check (works with updates off).
* ``commit``: ends the trial now, as the agent's health gate does when it passes (the floor rises).
* ``rollback [--reason R]``: back to the previous model; the one that served is marked failed.

Every failure is an ``UpdateError`` whose code (``not_for_this_board``, ``validation_failed``...) the command line
prints (exit 1), or a configuration error (exit 2); ``--json`` prints one object. Progress of long downloads goes
to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from device.errors import Exit

ACTIONS = ("check", "install", "status", "commit", "rollback")
DEFAULT_REASON = "rolled back from the command line"
PROGRESS_MIN_BYTES = 1024 * 1024  # smaller downloads end before anyone would read a progress line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``update`` actions and their options.

    Args:
        p: The parser of the ``update`` subcommand.
    """
    from device.cliargs import positive_int, subcommand_parents

    sub = p.add_subparsers(dest="update_action", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help, description=help, parents=subcommand_parents())
        a.add_argument("--json", action="store_true", help="print one JSON object")
        return a

    action("check", "refresh the signed metadata and say what install would install")
    i = action("install", "download, verify, decrypt and validate a model, then switch to it on trial")
    i.add_argument("--version", type=positive_int, metavar="N",
                   help="the release version to install (default: the newest one check finds)")
    i.add_argument("--force", action="store_true",
                   help="install even when the board would defer (battery, temperature, power governor)")
    action("status", "what serves, the fallback, floors, failed versions, the trusted root and the last check")
    action("commit", "end the trial of the model on trial now: it stays, and the floor rises to its version")
    r = action("rollback", "go back to the previous model and mark the one that served as failed")
    r.add_argument("--reason", default=DEFAULT_REASON, metavar="R",
                   help=f"why, kept with the failed version (default: {DEFAULT_REASON!r})")


class DownloadProgress:
    """``progress(step, info)`` for the installer: one line on ``stream`` per 10 % of each download of at least
    ``min_bytes`` (a resumed download starts at the share it had)."""

    def __init__(self, stream=None, min_bytes: int = PROGRESS_MIN_BYTES) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.min_bytes = min_bytes
        self._shown: dict = {}

    def __call__(self, step: str, info: dict) -> None:
        if step != "download" or info.get("total", 0) < self.min_bytes:
            return
        key = (info["variant"], info["file"])
        tenth = info["bytes"] * 10 // info["total"]
        if tenth > self._shown.get(key, -1):
            self._shown[key] = tenth
            print(f"downloading {info['variant']} {info['file']}: {tenth * 10}% ({_size(info['bytes'])} of "
                  f"{_size(info['total'])})", file=self.stream, flush=True)


def run(args: argparse.Namespace) -> int:
    """Runs one ``update`` action; failures raise (the CLI prints them, as JSON with --json).

    Returns:
        ``Exit.OK``.
    """
    from device.cliargs import load_config
    from device.update import install as inst
    from device.update.store.store import ModelStore

    cfg = load_config(args)
    who = f"fieldnode update {args.update_action}"
    if args.update_action in ("status", "commit", "rollback"):  # the store alone: works with updates off
        store = ModelStore.for_state_dir(cfg.device.state_dir, who=who)
        if args.update_action == "status":
            result = inst.status(store)
        elif args.update_action == "commit":
            result = inst.commit(store)
        else:
            result = inst.rollback(store, args.reason)
    else:
        with inst.Installer.from_config(cfg, who=who, progress=DownloadProgress(),
                                        defer=board_defer(cfg)) as installer:
            if args.update_action == "check":
                result = installer.check()
            else:
                result = installer.install(args.version, force=args.force)
    if args.json:
        print(json.dumps({"ok": True, **result}))
    else:
        for line in RENDER[args.update_action](result):
            print(line)
    return Exit.OK


def board_defer(cfg):
    """Why this board should not install now, as the agent judges it: the level the power policy calls for on
    a fresh reading of the board (battery low and not charging, hot, power-good low...) is saver or critical.
    The agent asks its running governor instead; ``--force`` installs anyway."""

    def defer() -> str | None:
        from device.update.agentside import QUIET_LEVELS
        from drivers.sysfs import Sysfs, resolve_root
        from power.governor import Governor
        from power.policy import Policy
        from power.snapshot import BoardReader

        snap = BoardReader(Sysfs(resolve_root(cfg.drivers.sysfs_root))).read()
        plan = Governor(Policy.from_config(cfg.power), lambda: snap).step()
        if plan.level.label in QUIET_LEVELS:
            return f"the power policy calls for {plan.level.label} ({plan.reason})"
        return None

    return defer


# --- output for people ------------------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _when(t) -> str:
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "unknown time"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _serving(d) -> str:
    if not d or d == "bundled" or d.get("source") == "bundled":
        return "the bundled model" + (f" ({d['name']})" if isinstance(d, dict) and d.get("name") else "")
    state = d.get("state")
    return f"{d['name']} v{d['version']} (slot {d['slot']}{', ' + state if state else ''})"


def _refused(result: dict) -> list:
    lines = []
    for r in result.get("refused", []):
        what = " ".join(x for x in (f"v{r['version']}" if r["version"] is not None else "", r["variant"] or "") if x)
        lines.append(f"  refused {what or 'a target'}: [{r['code']}] {r['message']}")
    return lines


def _check_lines(result: dict) -> list:
    avail = result["available"]
    lines = [f"installed: {_serving(result['installed'])}"]
    if avail is None:
        lines.insert(0, f"{result['model']}: up to date")
    else:
        names = ", ".join(v["variant"] for v in avail["variants"])
        lines.insert(0, f"{avail['name']}: v{avail['version']} available (variants {names}; "
                        f"{_size(avail['download_bytes'])} to download)")
    return lines + _refused(result)


def _install_lines(result: dict) -> list:
    if not result["installed"]:
        return [f"{result['name']}: up to date, nothing to install (serving {_serving(result['serving'])})"]
    checks = "; ".join(f"{c['variant']} " + ("test vectors pass" if c["check"] == "vectors" else "outputs finite")
                       for c in result["checks"])
    return [f"installed {result['name']} v{result['version']} in slot {result['slot']}, on trial "
            f"(variants {', '.join(result['variants'])})",
            f"validated: {checks}",
            f"was: {_serving(result['previous'])}"]


def _status_lines(s: dict) -> list:
    active = s["active"]
    lines = [f"serving: {_serving(active) if active else 'the bundled model'}"
             + (f" since {_when(active['since'])}" if active else "")]
    if active and active.get("restarts"):
        lines.append(f"trial restarts: {active['restarts']}")
    fb = s["fallback"]
    lines.append(f"fallback: {_serving(fb) if fb else ('the bundled model' if active else 'none')}")
    floors = ", ".join(f"{n} v{v}" for n, v in sorted(s["floors"].items()))
    lines.append(f"floors: {floors or 'none'}")
    failed = [f"{n} v{e['version']} ({e['reason']}, {_when(e['at'])})" for n, es in sorted(s["failed"].items())
              for e in es]
    lines.append(f"failed: {'; '.join(failed) or 'none'}")
    if s.get("installing"):
        i = s["installing"]
        lines.append(f"installing: {i['name']} v{i['version']} into slot {i['slot']}")
    root = s.get("root_version")
    lines.append(f"trusted root: version {root}" if root is not None else "trusted root: none yet (never refreshed)")
    last = s.get("last_check")
    if last:
        avail = last.get("available")
        found = f"v{avail['version']} available" if avail else "up to date"
        lines.append(f"last check: {_when(last.get('checked_at'))}: {found}")
    else:
        lines.append("last check: never")
    lines += [f"problem: {p}" for p in s.get("problems", [])]
    return lines


def _commit_lines(r: dict) -> list:
    c = r["committed"]
    return [f"committed {c['name']} v{c['version']} (slot {c['slot']}); floor now v{r['floor']}"]


def _rollback_lines(r: dict) -> list:
    gone = r["rolled_back"]
    return [f"rolled back {gone['name']} v{gone['version']} (marked failed: {r['reason']})",
            f"serving: {_serving(r['serving'])}"]


RENDER = {"check": _check_lines, "install": _install_lines, "status": _status_lines, "commit": _commit_lines,
          "rollback": _rollback_lines}
