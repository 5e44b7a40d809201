"""``fieldnode status``: what the running agent on this board is doing, asked on its local control socket.

No broker is involved: the agent answers on ``<device.runtime_dir>/control.sock`` (:mod:`device.control`) from the
same ``status`` the MQTT command returns. The output is:

* a short block for a person (the default): the device and whether its board is SIMULATED, what serves
  (model, variant, backend and delegate), the governor's level, reason and override, the sensor's state and
  counters, the link, the spool's backlog and drops, the inference worker, the last result and the faults;
* ``--json``: the agent's status object, as is;
* ``--watch``: one line per second (``--interval``) in the style of ``fieldnode demo``, until Ctrl-C or
  ``--count`` lines; when the agent stops or restarts it says so in one line and reconnects. With ``--json``,
  one status object per line (the notes go to stderr).

No agent running is the one line ``fieldnode status: error [agent_unreachable]: ...`` saying what to do, and
exit 4, ``Exit.UNREACHABLE`` (with ``--json``, the error object on stdout too).

**Exit code**: 0 when the agent answers with no faults; 6, ``Exit.FAULTS``, when it reports faults or the config
file does not load (a watch: by its last line). A config file that does not load (a typo while the agent runs on
the config it started with) does not keep ``status`` from the agent: only ``device.runtime_dir`` is needed, read
from the file alone as far as it can be (:func:`runtime_dir_anyway`), else its default; one line names the
config's error, and the agent's status follows.
"""

from __future__ import annotations

import json
import os
import sys
import time

from device.clock import SYSTEM_CLOCK
from device.errors import Exit


def add_arguments(p) -> None:
    from device.cliargs import number, positive_int, positive_seconds

    p.add_argument("--json", action="store_true", help="print the agent's status object (with --watch, one a line)")
    p.add_argument("--watch", action="store_true", help="print one line a second until Ctrl-C (or --count lines)")
    p.add_argument("--interval", type=number(float, minimum=0.05, maximum=60, what="a number of seconds"),
                   default=1.0, help="with --watch: seconds between lines (default 1)")
    p.add_argument("--count", type=positive_int, default=None,
                   help="with --watch: stop after this many lines (a second the agent is unreachable counts too, "
                        "so a script always ends)")
    p.add_argument("--timeout", type=positive_seconds, default=2.0,
                   help="seconds to wait for the agent's answer (default 2)")


def run(args, clock=SYSTEM_CLOCK, out=print) -> int:
    from device.control import Client, ControlUnavailable

    path, bad_config = _socket_path(args)
    note = out if not args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    said = f"config    ERROR, the agent runs on the config it started with: {bad_config}" if bad_config else None
    if not args.watch:
        try:
            with Client(path, timeout=args.timeout) as client:
                st = _status(client)
        except ControlUnavailable:
            if said:  # the config may be why no agent runs: say it before the error
                print(said, file=sys.stderr, flush=True)
            raise
        if said:
            note(said)
        if args.json:
            out(json.dumps(st))
        else:
            for line in block(st, client.peer_pid or st.get("pid")):
                out(line)
        return Exit.FAULTS if bad_config or faults_of(st) else Exit.OK
    code = _watch(args, Client(path, timeout=args.timeout), clock, out, note, said)
    return Exit.FAULTS if bad_config and code == Exit.OK else code


def faults_of(st: dict) -> dict:
    """The faults of a status object, by part (empty when none, or when an agent of another version does not
    say)."""
    faults = st.get("faults")
    return faults if isinstance(faults, dict) else {}


def _socket_path(args) -> tuple[str, Exception | None]:
    """The control socket, and the config's error when the file does not load (the socket is then found from
    :func:`runtime_dir_anyway`)."""
    from device.cliargs import load_config
    from device.control import SOCKET_NAME, socket_path
    from device.errors import ConfigError

    try:
        return socket_path(load_config(args)), None
    except ConfigError as exc:
        return os.path.join(runtime_dir_anyway(getattr(args, "config", None)), SOCKET_NAME), exc


def runtime_dir_anyway(path: str | None = None, environ=None) -> str:
    """``device.runtime_dir`` from a config file that does not load as a whole, else its default.

    The file is found as :func:`device.config.load` finds it, and read as ``fieldnode diag`` reads it then
    (:func:`tools.diag.cli.fallback_config`): a file that parses as TOML gives the value even when another key is
    wrong; one that does not parse is read line by line for ``runtime_dir`` in ``[device]``.

    Args:
        path: The ``--config`` path, or None for ``$FIELDNODE_CONFIG`` or the default path.
        environ: Environment for ``FIELDNODE_CONFIG``; defaults to ``os.environ``.

    Returns:
        A valid directory path.
    """
    from device import config
    from tools.diag.cli import fallback_config

    return fallback_config(config.resolve_path(path, environ)[0]).device.runtime_dir


def _status(client) -> dict:
    from device.control import ControlProtocolError

    st = client.request("status")
    if not isinstance(st, dict):
        raise ControlProtocolError(f"the agent at {client.path} answered 'status' with {type(st).__name__}, "
                                   f"expected an object")
    return st


def _watch(args, client, clock, out, note, said: str | None = None) -> int:
    from device.control import ControlError, ControlProtocolError, ControlUnavailable

    start = tick = clock.monotonic()
    lines, pid, down, ok, faulty = 0, None, None, False, False
    try:
        while args.count is None or lines < args.count:
            try:
                st = _status(client)
            except (ControlUnavailable, ControlError, ControlProtocolError) as exc:
                if pid is None:
                    if said:
                        print(said, file=sys.stderr, flush=True)
                    raise  # never reached: the one-line error and its exit code, as without --watch
                if down is None:
                    note(f"agent unreachable: {exc}; retrying every {args.interval:g} s (Ctrl-C to stop)")
                down, ok = str(exc), False
            else:
                if pid is None:
                    if not args.json:
                        out(f"fieldnode status: device {st.get('device') or '-'}, agent pid "
                            f"{_pid(client.peer_pid or st.get('pid'))}, "
                            f"{_board(st)}; a line every {args.interval:g} s, Ctrl-C to stop")
                    if said:
                        note(said)
                elif client.peer_pid != pid:
                    note(f"agent restarted: pid {_pid(client.peer_pid)} (was {_pid(pid)}); reconnected")
                elif down is not None:
                    note(f"agent answers again (pid {_pid(pid)})")
                pid, down, ok, faulty = client.peer_pid or 0, None, True, bool(faults_of(st))
                out(json.dumps(st) if args.json else line(st, clock.monotonic() - start))
            lines += 1
            if args.count is not None and lines >= args.count:
                break
            now = clock.monotonic()
            tick = max(tick + args.interval, now)  # late (a slow agent): the next line a whole interval later
            clock.sleep(tick - now)
    except KeyboardInterrupt:  # the usual end of a watch, not a failure
        pass
    finally:
        client.close()
    if not ok:
        return Exit.UNREACHABLE
    return Exit.FAULTS if faulty else Exit.OK


# ------------------------------------------------------------------------------------------------ formatting


def _get(d, *keys, default=None):
    """``d[k1][k2]...``, or ``default`` where a level is missing or not an object (an agent of another version)."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def _obj(value) -> dict:
    """A part of the status as an object, or an empty one (missing, or of another shape)."""
    return value if isinstance(value, dict) else {}


def _pid(pid) -> str:
    return str(pid) if pid else "unknown"


def _board(st: dict) -> str:
    if not isinstance(st.get("simulated"), bool):
        return "board simulated or real: not said by this agent"
    if st["simulated"]:
        return f"SIMULATED board {st.get('virtual_board') or '(virtual)'}"
    return "real board"


def _num(value, fmt: str = "g", unit: str = "", none: str = "-") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return none
    return f"{value:{fmt}}{unit}"


def _dropped(spool) -> int:
    dropped = _get(spool, "dropped", default={})
    if isinstance(dropped, dict):
        return sum(v for v in dropped.values() if isinstance(v, int))
    return dropped if isinstance(dropped, int) else 0


def _last(st: dict, now: float | None = None):
    """``(label, score, age_s)`` of the last result, or None."""
    r = st.get("last_result")
    if not isinstance(r, dict) or r.get("label") is None:
        return None
    t = r.get("time")
    age = max(0.0, (time.time() if now is None else now) - t) if isinstance(t, (int, float)) else None
    return r.get("label"), r.get("score"), age


def _override(gov) -> str | None:
    o = _get(gov, "override")
    if isinstance(o, dict):
        by = f" by {o['by']}" if o.get("by") else ""
        left = f", {_num(o.get('remaining_s'))} s left" if o.get("remaining_s") is not None else ""
        return f"{o.get('level') or '?'}{by}{left}"
    if _get(gov, "plan", "override") is True:
        return "on"
    return None


def block(st: dict, pid: int | None = None) -> list[str]:
    """The status for a person: a few labelled lines, no Python reprs (``fieldnode send status`` prints it too).

    Args:
        st: A status object (:meth:`device.agent.agent.Agent.status`); an agent of another version may send parts
            missing or of another shape, and they print as unknown.
        pid: The agent's pid (the control socket's peer, or the status's ``pid``); printed as unknown when None.

    Returns:
        The lines, without line ends.
    """
    from device.cliargs import for_people

    rt, gov, sensor = _obj(st.get("runtime")), _obj(st.get("governor")), _obj(st.get("sensor"))
    link, spool = st.get("link"), st.get("spool")
    out = [f"device    {st.get('device') or '-'} (fieldnode {st.get('version') or '?'}, agent pid {_pid(pid)}): "
           f"{_board(st)}"]

    serving = st.get("serving", rt.get("serving"))
    what = (f"{rt.get('model') or '?'} {rt.get('model_version') or ''}".rstrip()
            + f", variant {rt.get('variant') or '-'} (requested {rt.get('requested_variant') or 'auto'}), "
              f"{rt.get('backend') or '?'} {rt.get('backend_version') or ''}".rstrip()
            + f" on {rt.get('delegate') or '?'}, {_num(rt.get('threads'))} threads")
    out.append(f"serving   {for_people(serving)}: {what}")
    if not serving and rt.get("not_serving_reason"):
        out.append(f"          not serving: {rt['not_serving_reason']}")
    if rt.get("variant_fallback"):
        out.append(f"          variant fallback: {for_people(rt['variant_fallback'])}")
    if rt.get("delegate_fallbacks"):
        out.append(f"          delegate fallbacks: {for_people(rt['delegate_fallbacks'])}")

    snap = _obj(gov.get("snapshot"))
    cap = _get(gov, "plan", "cpu_max_khz")
    batt = snap.get("battery_pct")
    out.append(f"governor  {gov.get('level') or '?'} ({gov.get('reason') or '-'}), cap "
               f"{_num(cap // 1000 if isinstance(cap, int) else None, unit=' MHz', none='none')}, "
               f"{_num(snap.get('temp_c'), '.1f', ' C', 'temperature unknown')}, "
               f"battery {_num(batt, '.0f', ' %') if batt is not None else 'none (mains)' if snap else 'unknown'}, "
               f"override {_override(gov) or 'none'}")
    plan = _obj(gov.get("plan"))
    if plan.get("mode") not in (None, "level"):
        target = _obj(plan.get("target"))
        goal = ""
        if target:
            meet = {True: "will be met", False: "will NOT be met", None: "not judged yet"}[target.get("will_meet")]
            goal = (f"; runtime target {_num(target.get('hours'), 'g', ' h')}, "
                    f"{_num(target.get('remaining_h'), '.1f', ' h')} left, {meet}")
        out.append(f"          planner {plan['mode']}: {plan.get('variant') or '?'}, "
                   f"{_num(plan.get('threads'))} threads{goal}")

    out.append(f"sensor    {sensor.get('state') or '?'}: {_num(sensor.get('frames'))} frames, "
               f"{_num(sensor.get('crc_errors'))} crc errors, {_num(sensor.get('seq_gaps'))} gaps, "
               f"{_num(sensor.get('dropped_frames'))} dropped, {_num(sensor.get('timeouts'))} timeouts, "
               f"{_num(sensor.get('reconnects'))} reconnects, last frame "
               f"{_num(sensor.get('last_frame_age_s'), '.1f', ' s ago', 'never')}")
    if sensor.get("last_error"):
        out.append(f"          last error: {sensor['last_error']}")

    if not isinstance(link, dict):
        out.append("link      off (no broker configured)")
    elif link.get("connected"):
        out.append(f"link      connected to {link.get('broker') or '?'}, {_num(link.get('inflight'))} in flight")
    else:
        why = f": {link['last_error']}" if link.get("last_error") else ""
        out.append(f"link      NOT connected to {link.get('broker') or '?'}{why}")

    if not isinstance(spool, dict):
        out.append("spool     off (no broker configured)")
    else:
        dropped = spool.get("dropped")
        out.append(f"spool     backlog {_num(spool.get('messages'))} messages ({_kb(spool.get('bytes'))}, oldest "
                   f"{_num(spool.get('oldest_age_s'), '.0f', ' s')}), dropped "
                   f"{for_people(dropped, none='none') if dropped else 'none'}")

    out.append(f"worker    pid {_pid(rt.get('worker_pid'))} ({rt.get('isolation') or '?'} isolation), "
               f"{_num(rt.get('restarts'))} restarts, {_num(rt.get('crashes'))} crashes, "
               f"{_num(rt.get('timeouts'))} timeouts")
    if rt.get("last_error"):
        out.append(f"          last error: {rt['last_error']}")

    last = _last(st)
    p50 = _get(rt, "latency", "p50_ms")
    tail = (f"last {last[0]} {_num(last[1], '.2f')}, {_num(last[2], '.1f', ' s ago', 'at an unknown time')}"
            if last else "no result yet")
    out.append(f"results   {_num(st.get('results'))}, {_num(st.get('failures'))} failures, p50 "
               f"{_num(p50, '.3f', ' ms')}; {tail}")

    faults = st.get("faults") or {}
    if isinstance(faults, dict) and faults:
        parts = []
        for part, f in faults.items():
            f = f if isinstance(f, dict) else {"problem": f}
            since = f" (for {_num(f.get('for_s'), '.0f', ' s')})" if f.get("for_s") is not None else ""
            parts.append(f"{part}: {f.get('problem') or '?'}{since}")
        out.append(f"faults    {'; '.join(parts)}")
    else:
        out.append("faults    none")
    out += _config_lines(_obj(st.get("config")))
    if st.get("trust_problems"):
        out.append(f"trust     {for_people(st['trust_problems'])}")
    return out


def _config_lines(cfg: dict) -> list[str]:
    """What a reload (SIGHUP) left: keys changed in the file that wait for a restart, a file that did not load."""
    out = []
    later = cfg.get("needs_restart")
    if isinstance(later, list) and later:
        out.append(f"config    changed in the file, applied at the next restart (systemctl restart fieldnode): "
                   f"{', '.join(str(k) for k in later)}")
    if cfg.get("reload_error"):
        out.append(f"config    the last reload failed and changed nothing: {cfg['reload_error']}")
    return out


def _kb(n) -> str:
    if not isinstance(n, int):
        return "-"
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} kB" if n < 1024 * 1024 else f"{n / 1048576:.1f} MB"


def line(st: dict, t: float) -> str:
    """One ``--watch`` line, ``key=value`` like ``fieldnode demo``'s."""
    rt, gov, sensor = _obj(st.get("runtime")), _obj(st.get("governor")), _obj(st.get("sensor"))
    link, spool = st.get("link"), st.get("spool")
    snap = _obj(gov.get("snapshot"))
    level = f"{gov.get('level') or '?'}{'(override)' if _override(gov) else ''}"
    cap = _get(gov, "plan", "cpu_max_khz")
    batt = snap.get("battery_pct")
    link_state = "off" if not isinstance(link, dict) else "up" if link.get("connected") else "down"
    last = _last(st)
    faults = st.get("faults") if isinstance(st.get("faults"), dict) else {}
    serving = st.get("serving", rt.get("serving"))
    last_text = f"{last[0]}({_num(last[1], '.2f')}) age={_num(last[2], '.1f', 's')}" if last else "- age=-"
    return (f"t={t:4.1f}s level={level:<11} temp={_num(snap.get('temp_c'), '5.1f', 'C')} "
            f"cap={_num(cap // 1000 if isinstance(cap, int) else None, unit='MHz')} "
            f"batt={_num(batt, '.1f', '%') if batt is not None else 'mains' if snap else '-'} "
            f"{rt.get('backend') or '?'}/{rt.get('delegate') or '?'} variant={rt.get('variant') or '-':<4} "
            f"threads={_num(rt.get('threads'))} serving={'yes' if serving else 'NO'} "
            f"p50={_num(_get(rt, 'latency', 'p50_ms'), '.3f', 'ms')} "
            f"sensor={sensor.get('state') or '?'} frames={_num(sensor.get('frames'))} "
            f"crc={_num(sensor.get('crc_errors'))} link={link_state} "
            f"backlog={_num(_get(spool, 'messages')) if isinstance(spool, dict) else '-'} "
            f"dropped={_dropped(spool) if isinstance(spool, dict) else '-'} "
            f"worker={_pid(rt.get('worker_pid')) if rt.get('worker_pid') else '-'} "
            f"restarts={_num(rt.get('restarts'))} results={_num(st.get('results'))} "
            f"failures={_num(st.get('failures'))} "
            f"last={last_text} "
            f"faults={','.join(faults) or 'none'}{' SIMULATED' if st.get('simulated') else ''}")
