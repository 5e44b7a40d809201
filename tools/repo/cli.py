"""``fieldnode repo``: the operator's update repository, a TUF repository of age-encrypted model releases.

Actions (docs/updates.md has the layout, the roles and keys, the threat model and a worked example):

* ``init DIR`` makes the keys (root and targets offline, snapshot and timestamp online) and version 1 of the
  metadata.
* ``add-model DIR --model FILE --name N --variant V --version INT ...`` encrypts a model once to a fresh release
  key and stages the signed targets metadata that lists it.
* ``grant DIR --device ID --recipient age1...`` (or ``--recipients-file F``) writes each board's release-key file.
* ``publish DIR`` makes what is staged live (new snapshot and timestamp); ``rotate DIR --role R`` replaces a
  role's keys; ``export DIR --usb OUT`` writes a copy for a stick; ``status DIR`` shows it all.

Every failure is a ``RepositoryError`` (code ``repository_error``) naming what is wrong; ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json
import sys

from device.errors import Exit

ACTIONS = ("init", "add-model", "grant", "publish", "rotate", "export", "status", "serve")
ROLE_NAMES = ("root", "targets", "snapshot", "timestamp")


def _expires(text: str):
    role, sep, days = text.partition("=")
    try:
        value = float(days)
    except ValueError:
        value = -1.0
    if not sep or role not in ROLE_NAMES or not value > 0 or value > 3660:
        raise argparse.ArgumentTypeError(f"expected ROLE=DAYS with ROLE one of {', '.join(ROLE_NAMES)} and DAYS "
                                         f"from 0 to 3660, got {text!r}")
    return role, value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``repo`` actions and their options.

    Args:
        p: The parser of the ``repo`` subcommand.
    """
    from device.cliargs import number, positive_int, subcommand_parents

    sub = p.add_subparsers(dest="repo_action", metavar="ACTION", required=True)

    def action(name: str, help: str, *, keys: bool = False, online: bool = False, expires: bool = False):
        a = sub.add_parser(name, help=help, description=help, parents=subcommand_parents())
        a.add_argument("dir", metavar="DIR", help="the repository directory")
        a.add_argument("--json", action="store_true", help="print one JSON object")
        if keys:
            a.add_argument("--keys", metavar="DIR", help="the offline key directory (default DIR/keys/offline)")
        if online:
            a.add_argument("--online-keys", metavar="DIR", help="the online key directory (default DIR/keys/online)")
        if expires:
            a.add_argument("--expires", metavar="ROLE=DAYS", type=_expires, action="append", default=[],
                           help="days until ROLE's new metadata expires; repeatable (defaults: root=365, "
                                "targets=180, snapshot=30, timestamp=7)")
        return a

    i = action("init", "make a new repository: keys for the four roles and version 1 of the metadata",
               keys=True, online=True, expires=True)
    for role in ("root", "targets"):
        i.add_argument(f"--{role}-keys", type=positive_int, default=1, metavar="N", help=f"{role} keys (default 1)")
        i.add_argument(f"--{role}-threshold", type=positive_int, default=1, metavar="K",
                       help=f"{role} keys that must sign (default 1)")
    m = action("add-model", "encrypt a model once to a fresh release key and stage the targets that list it",
               keys=True, expires=True)
    m.add_argument("--model", required=True, metavar="FILE", help="the plaintext .tflite file")
    m.add_argument("--name", required=True, metavar="N", help="the model name")
    m.add_argument("--variant", required=True, metavar="V", help="the variant name")
    m.add_argument("--version", required=True, type=positive_int, metavar="INT",
                   help="the release version, above every one listed for this name and variant")
    m.add_argument("--hwclass", nargs="+", action="extend", default=[], metavar="C",
                   help="hardware classes that may install it (default: any)")
    m.add_argument("--ring", default="stable", metavar="R", help="the rollout ring (default stable)")
    m.add_argument("--min-agent", metavar="X.Y.Z", help="the lowest agent version that may install it")
    m.add_argument("--test-vectors", metavar="FILE", help="test vectors, shipped encrypted as a second target")
    g = action("grant", "write each board's release-key file (the release key encrypted to the board)")
    who = g.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", metavar="ID", help="the board's device id (with --recipient)")
    who.add_argument("--recipients-file", metavar="F", help="a file of 'DEVICE-ID age1...' lines")
    g.add_argument("--recipient", metavar="age1...", help="the board's age recipient (with --device)")
    g.add_argument("--release", metavar="REL", help="the release id (see status)")
    g.add_argument("--name", metavar="N", help="the model name (with --version; every variant unless --variant)")
    g.add_argument("--variant", metavar="V", help="only this variant")
    g.add_argument("--version", type=positive_int, metavar="V", help="the release version")
    pub = action("publish", "make the staged changes live: new snapshot and timestamp versions",
                 keys=True, online=True, expires=True)
    pub.add_argument("--resign", action="append", default=[], choices=("root", "targets"),
                     help="also re-sign this offline role with a new version and expiry (needs --keys)")
    r = action("rotate", "replace one role's keys and stage the new root (then publish)",
               keys=True, online=True, expires=True)
    r.add_argument("--role", required=True, choices=ROLE_NAMES, help="the role whose keys are replaced")
    r.add_argument("--count", type=positive_int, metavar="N", help="new keys (default: as many as now)")
    r.add_argument("--threshold", type=positive_int, metavar="K", help="keys that must sign (default: as now)")
    e = action("export", "write a self-contained copy for a USB stick, with a long-lived timestamp",
               online=True, expires=True)
    e.add_argument("--usb", required=True, metavar="OUT", help="an empty directory on the stick, or an earlier export")
    e.add_argument("--valid-days", type=number(float, above=0, maximum=366), default=30.0, metavar="D",
                   help="days the stick stays valid (default 30)")
    action("status", "show roles, versions, expiries, thresholds, releases and grants", keys=True, online=True)
    sv = action("serve", "answer the boards' MQTT chunk requests (MQTT 5 shared subscription) until SIGTERM")
    sv.add_argument("--broker", required=True, metavar="URL", help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    sv.add_argument("--group", default="fieldnode-repo", metavar="G", help="shared subscription group")
    sv.add_argument("--root", default="fieldnode/v1/repo", metavar="R", help="topic root of the requests")
    sv.add_argument("--ca", default="", metavar="FILE", help="CA file (mqtts)")
    sv.add_argument("--cert", default="", metavar="FILE", help="client certificate (mqtts)")
    sv.add_argument("--key", default="", metavar="FILE", help="client key (mqtts)")
    sv.add_argument("--stats-s", type=number(float, above=0), default=60.0, metavar="S",
                    help="seconds between count lines on stderr (default 60)")


def run(args: argparse.Namespace) -> int:
    """Runs one ``repo`` action; failures raise RepositoryError (the CLI prints it, as JSON with --json).

    Returns:
        ``Exit.OK``.
    """
    from device.update.errors import RepositoryError

    try:
        result, lines = _dispatch(args)
    except OSError as exc:  # anything not already named by the action: still one line naming the file
        raise RepositoryError(f"{exc.filename or args.dir}: {exc.strerror or exc}") from exc
    if args.json:
        print(json.dumps({"ok": True, **result}))
    else:
        for line in lines:
            print(line)
    return Exit.OK


def _repo(args):
    from tools.repo.meta import Repository

    return Repository(args.dir, keys=getattr(args, "keys", None), online_keys=getattr(args, "online_keys", None))


def _dispatch(args) -> tuple:
    from device.update.errors import RepositoryError

    days = dict(getattr(args, "expires", []) or [])
    action = args.repo_action
    if action == "init":
        from tools.repo.meta import init

        res = init(args.dir, counts={"root": (args.root_keys, args.root_threshold),
                                     "targets": (args.targets_keys, args.targets_threshold)},
                   days=days, keys=args.keys, online_keys=args.online_keys)
        lines = [f"repository: {args.dir} (version 1 published)"]
        lines += [f"{r}: {len(v['keyids'])} key(s), threshold {v['threshold']}, expires {v['expires']}"
                  for r, v in res["roles"].items()]
        lines += [f"offline keys (root, targets): {res['offline_keys']}  <- MOVE THESE OFF THIS MACHINE",
                  f"online keys (snapshot, timestamp): {res['online_keys']}",
                  f"boards trust: {args.dir}/metadata/1.root.json (install it as each board's root file)"]
        return res, lines
    if action == "add-model":
        from tools.repo.release import add_model

        res = add_model(_repo(args), model=args.model, name=args.name, variant=args.variant, version=args.version,
                        hwclass=args.hwclass, ring=args.ring, min_agent=args.min_agent,
                        test_vectors=args.test_vectors, days=days)
        lines = [f"release: {res['release']}", f"target: {res['target']} ({res['length']} bytes encrypted, "
                 f"{res['plaintext_length']} plain, sha256 {res['plaintext_sha256']})",
                 f"release key: {res['release_key']} (never publish it)",
                 f"staged: targets version {res['targets_version']}; next: fieldnode repo grant {args.dir} "
                 f"--release {res['release']} ..., then fieldnode repo publish {args.dir}"]
        return res, lines
    if action == "grant":
        from tools.repo.release import grant, read_recipients

        if args.device is not None:
            if not args.recipient:
                raise RepositoryError("grant: --device needs --recipient age1...")
            devices = [(args.device, args.recipient)]
        else:
            if args.recipient:
                raise RepositoryError("grant: --recipient goes with --device, not with --recipients-file")
            devices = read_recipients(args.recipients_file)
        res = grant(_repo(args), devices, release=args.release, name=args.name, variant=args.variant,
                    version=args.version)
        return res, [f"granted {', '.join(res['releases'])} to {res['devices']} board(s): {len(res['files'])} "
                     f"file(s) under {args.dir}/grants/"]
    if action == "publish":
        from tools.repo.publish import publish

        res = publish(_repo(args), resign=tuple(args.resign), days=days)
        lines = [f"published {', '.join(f'{r} {v}' for r, v in res['published'].items())}"]
        lines += [f"{r} expires {e}" for r, e in res["expires"].items()]
        return res, lines
    if action == "rotate":
        from tools.repo.publish import rotate

        res = rotate(_repo(args), args.role, count=args.count, threshold=args.threshold, days=days)
        lines = [f"{res['role']}: {len(res['new_keyids'])} new key(s), threshold {res['threshold']}; root version "
                 f"{res['root_version']} staged; run fieldnode repo publish {args.dir} to make it live"]
        lines += [f"retired: {p}" for p in res["retired"]]
        return res, lines
    if action == "export":
        from tools.repo.export import export

        res = export(_repo(args), args.usb, valid_days=args.valid_days, days=days)
        return res, [f"exported {res['files']} file(s) to {res['out']}: timestamp version {res['timestamp_version']} "
                     f"valid until {res['valid_until']}; the online repository is now at timestamp version "
                     f"{res['online_timestamp_version']}"]
    if action == "serve":
        from device.link.url import TlsFiles
        from tools.repo.serve import serve

        res = serve(args.dir, args.broker, tls=TlsFiles(args.ca, args.cert, args.key), group=args.group,
                    root=args.root, stats_s=args.stats_s)
        return res, [f"served {res['requests']} request(s) {json.dumps(res['status'], sort_keys=True)}, "
                     f"{res['bytes']} bytes"]
    from tools.repo.release import status

    res = status(_repo(args))
    lines = [f"repository: {res['path']}" + (f" (staged, not published: {', '.join(res['staged'])})"
                                             if res["staged"] else "")]
    for role, v in res["roles"].items():
        lines.append(f"{role}: version {v['version']}, expires {v['expires']}{' (EXPIRED)' if v['expired'] else ''}, "
                     f"threshold {v['threshold']} of {len(v['keyids'])} ({v['keys_here']} key(s) here)")
    for rel in res["releases"]:
        lines.append(f"{rel['name']}/{rel['variant']} version {rel['version']}: {rel['release']}, hwclass "
                     f"{', '.join(rel['hwclass']) or 'any'}, ring {rel['ring']}, {rel['grants']} grant(s)"
                     f"{'' if rel['published'] else ' (staged)'}")
    lines.append(f"grants: {res['grants']}")
    lines += [f"key problem: {p}" for p in res["key_problems"]]
    return res, lines


if __name__ == "__main__":  # pragma: no cover - the CLI entry point is tools.cli
    sys.exit("run it as: fieldnode repo ...")
