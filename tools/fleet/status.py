"""``fieldnode fleet status``: the fleet as the boards' retained states say, in seconds, with no server.

It reads every ``fieldnode/v1/<id>/state`` (:mod:`tools.fleet.states`, complete when its marker comes back), then
prints the counts per group, per model version, per update state and per connection state, the boards that are
offline or lost with their last-seen times, and the retained states it could not read. ``--group`` and ``--where``
(:mod:`tools.fleet.where`) choose the boards counted; with ``--where`` every matching board is listed ("who runs
model X version Y"). ``--watch`` keeps running and prints each change, by the session rule. ``--json`` prints one
object (with ``--watch``, then one line per change).

Exit codes (:class:`device.errors.Exit`): 0 the view is complete; 2 bad input; 3 the deadline passed before the
marker came back (what came is printed, marked incomplete); 4 could not connect or subscribe.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import TextIO

from device.clock import SYSTEM_CLOCK, Clock
from device.cliargs import print_error
from device.errors import ConfigError, Exit, FieldnodeError, UsageError
from device.link.errors import BadInput, BrokerUrlError, ConnectError, LinkError, SubscribeError
from device.link.mqttclient import Endpoint
from device.link.session import printable
from tools.fleet.states import (Board, Change, FleetView, StateReader, load_known, read_fleet, save_known,
                                 when)
from tools.fleet.where import Condition, matches, where_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``fleet status`` options (and the broker's, as ``fieldnode send`` takes them).

    Args:
        p: The parser of ``fleet status``.
    """
    from tools.send import add_connection_arguments

    p.add_argument("--group", metavar="G", help="only the boards in group G")
    p.add_argument("--where", type=where_argument, default=(), metavar="EXPR",
                   help="only the boards that meet every condition: key=value, key!=value, and version<, <=, >, >= "
                        "(keys: model, version, variant, state, update, group, level, fault), comma-separated; "
                        "the matching boards are listed")
    p.add_argument("--watch", action="store_true", help="keep running and print every change (Ctrl-C ends it)")
    p.add_argument("--json", action="store_true", help="print one JSON object (with --watch, then a line per change)")
    p.add_argument("--known", metavar="FILE", help="keep the last online state of every board in FILE, so the groups "
                                                   "and models of boards that are offline now are known")
    add_connection_arguments(p)


def run(args: argparse.Namespace, *, clock: Clock = SYSTEM_CLOCK, out: TextIO | None = None,
        stop: threading.Event | None = None) -> int:
    """Reads the fleet and prints it.

    Args:
        args: The parsed options.
        clock: Time source of the ``--timeout`` deadline.
        out: Where to print (default stdout).
        stop: Ends ``--watch`` when set (a seam for tests; Ctrl-C ends it otherwise).

    Returns:
        An :class:`~device.errors.Exit` code (see the module docstring).
    """
    out = out or sys.stdout
    deadline = clock.monotonic() + args.timeout
    try:
        reader, complete = connect_fleet(args, deadline=deadline, clock=clock)
    except FieldnodeError as exc:
        return _fail(args, exc)
    try:
        with reader.cond:
            doc = summarize(reader.view, group=args.group, where=args.where, complete=complete)
        if args.json:
            print(json.dumps(doc, ensure_ascii=True), file=out, flush=True)
        else:
            for line in render(doc):
                print(line, file=out, flush=True)
        if not complete:
            print(f"fieldnode fleet status: warning: the broker's replay did not end within {args.timeout:g} s; "
                  f"the view may be incomplete", file=sys.stderr)
        if args.known:
            save_known(args.known, reader.view)
        while args.watch:
            try:
                _watch(args, reader, out, stop)
                break
            except ConnectError as exc:  # a broker restart, a network gap: connect again and go on watching
                reader.close()
                reader = _rejoin(args, reader, exc, stop, clock)
                if reader is None:
                    break
    except (ConnectError, LinkError) as exc:
        return _fail(args, exc)
    finally:
        if reader is not None:
            reader.close()
    return Exit.OK if complete else Exit.TIMEOUT


_REJOIN_S = (0.5, 30.0)  # the first and the longest wait between two attempts to connect again


def _rejoin(args: argparse.Namespace, old: StateReader, why: ConnectError, stop: threading.Event | None,
            clock: Clock) -> StateReader | None:
    """Connects again, with a doubling wait, until it works or ``stop`` is set (None then); the states read again
    go into the same view, so what changed while away is printed as changes."""
    print(f"fieldnode fleet status: {why}; connecting again", file=sys.stderr, flush=True)
    wait, last = _REJOIN_S[0], None
    while stop is None or not stop.is_set():
        try:
            reader, complete = read_fleet(old.endpoint, deadline=clock.monotonic() + args.timeout, view=old.view,
                                          clock=clock)
        except (ConnectError, SubscribeError) as exc:
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
            wait = min(wait * 2, _REJOIN_S[1])
            last = exc
            continue
        print("fieldnode fleet status: connected again" + ("" if complete else " (the replay did not end in time)")
              + (f" (the last failed attempt: {last})" if last is not None else ""), file=sys.stderr, flush=True)
        return reader
    return None


def connect_fleet(args: argparse.Namespace, *, deadline: float, clock: Clock = SYSTEM_CLOCK
                  ) -> tuple[StateReader, bool]:
    """Connects as the connection options say and reads every retained state (``--known`` first, if given).

    Returns:
        ``(reader, complete)``: the connected reader (close it) and whether the marker came back in time.

    Raises:
        BadInput, BrokerUrlError, ConfigError, UsageError: Bad input. ConnectError, SubscribeError: The broker.
    """
    from tools.send import connection

    target, url, tls, username, password = connection(args, need_device=False)
    known = load_known(args.known) if args.known else {}
    endpoint = Endpoint(url, tls, username, password if username is not None else None, target.protocol)
    return read_fleet(endpoint, deadline=deadline, known=known, clock=clock)


def selected(view: FleetView, group: str | None, where: tuple[Condition, ...]) -> list[Board]:
    """The boards of the view in ``group`` (if given) that meet ``where``, by id."""
    return [b for _d, b in sorted(view.boards.items())
            if (group is None or group in b.groups) and matches(b, where)]


def summarize(view: FleetView, *, group: str | None = None, where: tuple[Condition, ...] = (),
              complete: bool = True) -> dict:
    """The counts and the boards, as ``--json`` prints them.

    Returns:
        ``{"complete", "boards_seen", "selected", "counts": {"state", "group", "model", "update"}, "boards": [...],
        "unreadable": {device: why}, "filter": {...}}``. ``boards`` lists the offline and lost boards, or with
        ``where`` every selected board.
    """
    boards = selected(view, group, where)
    counts: dict[str, dict[str, int]] = {"state": {}, "group": {}, "model": {}, "update": {}}

    def count(kind: str, key: str) -> None:
        counts[kind][key] = counts[kind].get(key, 0) + 1

    for b in boards:
        count("state", b.state)
        known = b.state == "online" or b.online is not None
        for g in b.groups or ["(none)" if known else "(unknown)"]:
            count("group", g)
        for name, version in b.models() or [("(none)" if known else "(unknown)", None)]:
            count("model", name if version is None else f"{name} {version}")
        update = b.get("update")
        count("update", update.get("state", "(unknown)") if isinstance(update, dict) else
              ("(none)" if known else "(unknown)"))
    listed = boards if where else [b for b in boards if b.state != "online"]
    return {"complete": complete, "boards_seen": len(view.boards), "selected": len(boards),
            "filter": {"group": group, "where": [f"{c.key}{c.op}{c.value}" for c in where]},
            "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
            "boards": [b.as_json() for b in listed], "unreadable": dict(sorted(view.unreadable.items()))}


def render(doc: dict) -> list[str]:
    """The lines ``fleet status`` prints for people."""
    f = doc["filter"]
    chosen = " and ".join(x for x in ((f"in group {f['group']}" if f["group"] else ""),
                                      (f"where {','.join(f['where'])}" if f["where"] else "")) if x)
    n = doc["selected"]
    head = f"{n} board{'s' if n != 1 else ''}" + (f" {chosen} (of {doc['boards_seen']})" if chosen else "")
    if doc["unreadable"]:
        head += f", {len(doc['unreadable'])} unreadable"
    lines = [head + ("" if doc["complete"] else " (incomplete: the replay did not end in time)")]
    for kind, label in (("state", "by state"), ("group", "by group"), ("model", "by model"),
                        ("update", "by update")):
        items = doc["counts"][kind]
        if items:
            lines.append(f"{label + ':':11}" + ", ".join(f"{printable(k)} {v}" for k, v in items.items()))
    if doc["boards"]:
        lines.append("matching boards:" if f["where"] else "offline and lost:")
        for b in doc["boards"]:
            models = ", ".join(f"{k} {v.get('version')}" for k, v in sorted((b.get("models") or {}).items()))
            extra = f"  {models}" if f["where"] and models else ""
            lines.append(f"  {printable(b['device']):20} {b['state']:8} last seen {when(b['last_seen'])}{extra}")
    if doc["unreadable"]:
        lines.append("unreadable:")
        lines += [f"  {printable(d):20} {printable(why)}" for d, why in doc["unreadable"].items()]
    return lines


def _watch(args: argparse.Namespace, reader: StateReader, out: TextIO, stop: threading.Event | None) -> None:
    while stop is None or not stop.is_set():
        for change in reader.changes(0.2 if stop is not None else None):
            with reader.cond:
                board = reader.view.boards.get(change.device)
                shown = board is None or (args.group is None or args.group in board.groups) and \
                    matches(board, args.where)
            line = _change_line(change, board, as_json=args.json) if shown else None
            if line is not None:
                print(line, file=out, flush=True)


def _change_line(change: Change, board: Board | None, *, as_json: bool) -> str | None:
    """One change as a line, or None for nothing new (the same ``online`` again, as a board heals its state)."""
    if change.before == change.after == "online" and not change.fields and not change.new_session \
            and not change.ignored:
        return None
    last_seen = board.last_seen if board is not None and not change.ignored else None
    if as_json:
        return json.dumps({"device": change.device, "before": change.before, "state": change.after,
                           "session": change.session, "ignored": change.ignored, "detail": change.detail,
                           "changed": {k: list(v) for k, v in change.fields.items()}, "last_seen": last_seen},
                          ensure_ascii=True, default=str)
    if change.before == change.after == "online" and not change.ignored:
        what = "; ".join(f"{k}: {_brief(a)} -> {_brief(b)}" for k, (a, b) in change.fields.items())
        again = f"online again (session {change.session})" if change.new_session else "online"
        return printable(f"{change.device}: {again}" + (f", {what}" if what else ""))
    text = f"{printable(change.device)}: {change.before or 'new'} -> {change.after}"
    if change.session is not None:
        text += f" (session {change.session})"
    if change.ignored:
        text += f"; ignored: {change.detail}"
    elif change.detail:
        text += f": {printable(change.detail)}"
    return text


def _brief(value: object) -> str:
    if isinstance(value, dict) and "state" in value:
        return str(value["state"])  # the update summary: its state says it
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _fail(args: argparse.Namespace, exc: FieldnodeError) -> int:
    if isinstance(exc, (BadInput, BrokerUrlError, ConfigError, UsageError)):
        code = Exit.USAGE
    elif isinstance(exc, (ConnectError, SubscribeError)):
        code = Exit.UNREACHABLE
    else:
        code = Exit.FAILED
    return print_error("fleet status", exc, as_json=bool(args.json), exit_code=code)
