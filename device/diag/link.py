"""Diag checks of the link and the running agent: broker and TLS, spool, the systemd service, the control socket.

The broker check makes a real connection of its own (TCP, the TLS handshake with the link's files, an MQTT
CONNECT and its CONNACK) through ``fieldnode send``'s session code, under a client id of its own, so a running
agent's connection is never taken over. The spool is read from the running agent when it answers; otherwise
the SQLite file is opened read-only (a reader never blocks the agent's commits, and never repairs or moves a
file: that is the agent's job at its start).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
import urllib.parse

from device.diag.checks import (RUN_ALL, SERVICE_GROUP, Check, fail, human_bytes, ok, register, skip,
                                systemd_running, warn, which, worst)

BROKER_TIMEOUT_S = 5.0
BACKLOG_WARN_S = 3600.0
SERVICE = "fieldnode"


# ------------------------------------------------------------------------------------------------- broker


def _broker_remedy(message: str, host: str, port: int) -> str:
    m = message.lower()
    if "refused the connection" in m:
        return ("the broker refused this board's credentials: check the client certificate, link.username and "
                "link.password_file, and the broker's ACL")
    if "refused" in m:
        return f"nothing listens on {host}:{port}: start the broker, or fix the host and port in link.broker"
    if "certificate verify failed" in m or "certificate_verify_failed" in m:
        return (f"the broker's certificate does not chain to link.ca_file or does not name {host}: use the "
                f"fleet's CA file, and the broker's name as its certificate gives it")
    if "before connack" in m:
        return ("the broker dropped the connection in the handshake: it does not accept this client certificate "
                "(another CA, expired or revoked; see the certificate check)")
    if "name or service not known" in m or "name resolution" in m or "nodename nor servname" in m:
        return f"{host} does not resolve: check DNS on the board, or use the broker's IP address"
    if "timed out" in m or "no connack" in m or "unreachable" in m:
        return f"the broker does not answer: check the network path and any firewall to {host}:{port}"
    return f"check that the broker at {host}:{port} runs and accepts this board (its log says why it refused)"


@register("broker")
def check_broker(ctx) -> Check:
    from device import config
    from device.clock import SYSTEM_CLOCK
    from device.link import session as mqtt_session
    from device.link.errors import LinkError
    from device.link.mqttclient import Endpoint
    from device.link.url import PasswordFileError

    lc = ctx.cfg.link
    if not lc.broker:
        return skip("broker", "link.broker is empty: the board runs without a link")
    tls = lc.tls()
    try:
        endpoint = Endpoint.from_link_config(lc)  # the password file read as the link reads it
    except PasswordFileError as exc:
        return fail("broker", str(exc), "run diag as the fieldnode user or root, or fix link.password_file")
    except LinkError as exc:
        return fail("broker", str(exc), "fix the TLS files of [link] (see the keys and certificate checks)")
    url = endpoint.url
    timeout = ctx.remaining(BROKER_TIMEOUT_S)
    request = mqtt_session.build_request(config.device_id(ctx.cfg), "ping", {}, prefix=lc.prefix or None)
    t0 = time.monotonic()
    # fieldnode send's session: a random client id of its own, no reconnects, every wait bounded by the deadline.
    session = None
    try:
        session = mqtt_session.Session(endpoint, request, timeout, SYSTEM_CLOCK.monotonic() + timeout, SYSTEM_CLOCK)
        session.connect(missing_cert=url.tls and not tls.cert)
    except LinkError as exc:
        return fail("broker", str(exc), _broker_remedy(str(exc), url.host, url.port))
    finally:
        if session is not None:
            session.close()
    ms = (time.monotonic() - t0) * 1000
    how = "TLS handshake and " if url.tls else ""
    who = " with a client certificate" if tls.cert else ""
    return ok("broker", f"{url}: {how}MQTT CONNECT accepted{who} in {ms:.0f} ms")


# -------------------------------------------------------------------------------------------------- spool


def read_spool(path: str, timeout: float) -> dict:
    """Backlog and drop counters of a spool file, read-only (the agent's own commits go on meanwhile).

    Raises:
        sqlite3.Error: The file cannot be opened or read (locked, not a spool, corrupt).
    """
    from device.link.spool.db import KIND_NAMES, Kind, totals

    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    try:
        counts, sizes = totals(db, tuple(Kind))
        meta = {k: int(v) for k, v in db.execute("SELECT key, value FROM meta")}
        oldest = db.execute("SELECT MIN(created) FROM messages").fetchone()[0]
    finally:
        db.close()
    return {"messages": sum(counts.values()), "bytes": sum(sizes.values()),
            "oldest_age_s": 0.0 if oldest is None else max(0.0, time.time() - oldest),
            "by_kind": {KIND_NAMES[k]: n for k, n in counts.items()},
            "dropped": {KIND_NAMES[k]: meta.get(f"dropped_{KIND_NAMES[k]}", 0) for k in Kind}, "path": path}


@register("spool")
def check_spool(ctx) -> Check:
    if not ctx.cfg.link.broker:
        return skip("spool", "no link: nothing is spooled")
    status, _why = ctx.agent()
    stats = status.get("spool") if status else None
    source = "from the running agent"
    if not isinstance(stats, dict):
        path = os.path.join(ctx.state_dir, "spool", "spool.db")
        if not os.path.exists(path):
            return skip("spool", f"no spool yet at {path} (the link has not run on this state directory)")
        if ctx.who.not_the_service and not os.access(path, os.R_OK):
            # The spool is the service's (0600): this user's refusal says nothing of the spool or the service.
            return skip("spool", f"{path} is the service's file, which {ctx.who.user} may not read (that is "
                                 f"this user's permission, not a fault of the service); {RUN_ALL} reads it")
        try:
            stats = read_spool(path, ctx.remaining(2.0))
        except sqlite3.Error as exc:
            return warn("spool", f"{path}: cannot read it ({exc})",
                        "the agent checks and repairs it at its next start; run diag as the fieldnode user or root")
        source = "read from the file"
    found = []
    dropped = {k: v for k, v in (stats.get("dropped") or {}).items() if v}
    if dropped:
        found.append(warn("spool", f"{sum(dropped.values())} message(s) dropped ({', '.join(f'{k} {v}' for k, v in dropped.items())}): "
                                   f"the budget or age limit was reached while the broker was unreachable",
                          "see the broker check; raise link.spool_max_mb or link.spool_max_age_h if outages are long"))
    n, age = stats.get("messages") or 0, stats.get("oldest_age_s") or 0.0
    if n and age > BACKLOG_WARN_S:
        found.append(warn("spool", f"{n} message(s) waiting, the oldest {age / 3600:.1f} h old: the link is not "
                                   f"delivering", "see the broker check; the agent sends the backlog once it connects"))
    return worst("spool", found, f"{n} message(s) waiting ({human_bytes(stats.get('bytes') or 0)}), none dropped "
                                 f"({source})")


# ------------------------------------------------------------------------------------------------ service


def service_state(timeout: float) -> dict:
    """``systemctl show fieldnode`` as a dict (LoadState, ActiveState, SubState, NRestarts, Result, WatchdogUSec).

    Raises:
        OSError, subprocess.SubprocessError: systemctl cannot run or does not answer in time.
    """
    props = "LoadState,ActiveState,SubState,NRestarts,Result,WatchdogUSec"
    tool = which("systemctl") or "systemctl"
    proc = subprocess.run([tool, "show", SERVICE, "-p", props], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip() or f"systemctl exited with {proc.returncode}")
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


@register("service", needs_config=False)
def check_service(ctx) -> Check:
    if not systemd_running():
        try:
            with open("/proc/1/comm", encoding="utf-8") as f:
                init = f.read().strip()
        except OSError:
            init = "unknown"
        return skip("service", f"systemd is not running here (PID 1 is {init}): no service to check")
    try:
        s = service_state(ctx.remaining(3.0))
    except (OSError, subprocess.SubprocessError) as exc:
        return skip("service", f"systemctl did not answer: {exc}")
    journal = f"journalctl -u {SERVICE} -e says why"
    if s.get("LoadState") == "not-found":
        return warn("service", f"{SERVICE}.service is not installed",
                    "install it: fieldnode install (it writes the unit, users and rules), then systemctl enable --now fieldnode")
    state = f"{s.get('ActiveState')} ({s.get('SubState')})"
    restarts = int(s.get("NRestarts") or 0)
    wd = s.get("WatchdogUSec", "0")
    detail = f"{SERVICE}.service {state}, {restarts} restart(s), last result {s.get('Result')}, watchdog {wd}"
    if s.get("ActiveState") in ("failed", "inactive", "deactivating"):
        return fail("service", detail, f"systemctl start {SERVICE}; {journal}")
    found = []
    if s.get("Result") == "watchdog":
        found.append(warn("service", f"{detail}: the watchdog killed a hung agent",
                          f"{journal}; send the diag --report bundle"))
    elif restarts:
        found.append(warn("service", f"{detail}: it has restarted", f"{journal} (a crash or a watchdog kill)"))
    if s.get("ActiveState") == "activating":
        found.append(warn("service", f"{detail}: still starting", "wait for it (the model warms before READY), then run diag again"))
    return worst("service", found, detail)


# -------------------------------------------------------------------------------------------------- agent


def _summary(status: dict) -> str:
    rt = status.get("runtime") if isinstance(status.get("runtime"), dict) else {}
    gov = status.get("governor") if isinstance(status.get("governor"), dict) else {}
    sensor = status.get("sensor") if isinstance(status.get("sensor"), dict) else {}
    parts = [f"pid {status.get('pid')}" if status.get("pid") else "",
             f"device {status.get('device')}" if status.get("device") else "",
             f"variant {rt.get('variant')}" if rt.get("variant") else "",
             f"level {gov.get('level')}" if gov.get("level") else "",
             f"sensor {sensor.get('state')}" if sensor.get("state") else "",
             "SIMULATED" if status.get("simulated") else ""]
    return ", ".join(p for p in parts if p) or "answers"


@register("agent", needs_config=False)  # a config that does not load still names (or defaults) the socket
def check_agent(ctx) -> Check:
    status, why = ctx.agent()
    if status is not None:
        faults = status.get("faults") or {}
        text = f"{why}: {_summary(status)}"
        if faults:
            problems = "; ".join(f"{part}: {f.get('problem') if isinstance(f, dict) else f}" for part, f in faults.items())
            return warn("agent", f"{text}; it reports faults: {problems}",
                        "see the checks of those parts above; the LED shows the same fault code")
        return ok("agent", text)
    if why == "this build of fieldnode has no control socket":
        return skip("agent", why)
    if ctx.agent_denied:  # EACCES on the socket: this user may not ask, which says nothing of the agent
        return skip("agent", f"not asked: the agent's control socket refuses {ctx.who.user}, who is not in the "
                             f"group {SERVICE_GROUP} ({why}); {RUN_ALL} asks it")
    h = ctx.holder()
    if h:
        if h.get("unknown"):  # the lock file is the service's: this user cannot tell who holds it
            return warn("agent", f"cannot tell whether an agent holds {ctx.state_dir} ({h['unknown']}), and none "
                                 f"answers on its control socket ({why})",
                        "run diag with sudo, or as a member of the group fieldnode")
        who = f"pid {h['pid']}" if h.get("pid") else "an agent (pid unknown)"
        return fail("agent", f"{who} holds the state directory {ctx.state_dir} but does not answer "
                             f"on its control socket ({why})",
                    "the agent may be hung: systemctl restart fieldnode, and send a diag --report bundle")
    if ctx.sim:
        return skip("agent", f"no agent runs on {ctx.state_dir} (a simulated diagnosis does not need one)")
    return warn("agent", f"no agent runs on {ctx.state_dir} ({why})",
                "start it: systemctl start fieldnode (journalctl -u fieldnode -e says why it stopped)")
