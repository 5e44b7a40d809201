"""Diag checks of the board's own files: config, identity, key files, certificates, clock, trust, update store, disk.

Every check here reads files and asks nothing of the network or the hardware. The config check is the agent's
own validation (:func:`device.config.check_agent` and the power policy's rules), so ``diag`` never passes a
config that ``fieldnode run`` refuses.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess

from device.diag.checks import (Check, fail, file_mode_problem, human_bytes, nearest_dir, ok,
                               register, skip, warn, which, worst)

CERT_WARN_DAYS = 30
CLOCK_SLACK_S = 3600.0  # file times and the clock may differ a little; an unset clock is off by years
DISK_MIN_FREE_PCT = 10.0


def _utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------------------------- config


@register("config", needs_config=False)
def check_config(ctx) -> Check:
    from device import config
    from device.configfiles import service_identity
    from device.errors import ConfigError
    from power.policy import Policy

    err = getattr(ctx, "config_error", None)
    if err is None:
        try:
            config.check_agent(ctx.cfg, service_identity())  # what fieldnode run refuses before it opens anything
            Policy.from_config(ctx.cfg.power)
        except ConfigError as exc:
            err = exc
    if err is not None:
        key = getattr(err, "key_path", "")
        where = getattr(err, "source", "") or "the config file"
        if where == config.DEFAULTS_SOURCE:  # no file: the defaults were used
            where = f"{config.DEFAULT_PATH} (it does not exist yet: fieldnode config defaults prints one)"
        fix = f"fix {key} in {where}" if key else f"fix {where}"
        not_run = getattr(ctx, "not_run", None) or []
        detail = str(err) + (f" (so these checks did not run: {', '.join(not_run)})" if not_run else "")
        return fail("config", detail, f"{fix}; 'fieldnode config check' says the same as 'fieldnode run'")
    cfg = ctx.cfg
    sensor = f"SIMULATED board {cfg.drivers.virtual_board}" if cfg.drivers.virtual_board \
        else f"sensor {cfg.drivers.sensor_url}"
    return ok("config", f"{config.describe_source(cfg)}: valid, as fieldnode run checks it ({sensor}, link "
                        f"{cfg.link.broker or 'off'})")


@register("identity")
def check_identity(ctx) -> Check:
    from device import config

    cfg = ctx.cfg
    dev = config.device_id(cfg)
    if cfg.device.id:
        return ok("identity", f"device id {dev} (device.id)")
    try:
        with open(config.MACHINE_ID_PATH, encoding="ascii") as f:
            from_machine = f.read().strip().lower()[:12] == dev
    except (OSError, UnicodeDecodeError):
        from_machine = False
    if from_machine:
        return ok("identity", f"device id {dev} (from {config.MACHINE_ID_PATH}; set device.id to fix it for good)")
    return warn("identity", f"device id {dev} comes from the host name: boards flashed from one image share it",
                "give each board its own id: fieldnode provision --device-id ID (or set device.id)")


# --------------------------------------------------------------------------------------------------- keys


@register("keys")
def check_keys(ctx) -> Check:
    cfg = ctx.cfg
    files = [(cfg.link.key_file, "TLS client key", "link.key_file"),
             (cfg.link.password_file, "password file", "link.password_file")]
    if cfg.update.root_file:  # updates on: the age identity opens the release keys
        files.append((cfg.update.identity_file, "update identity", "update.identity_file"))
    files = [f for f in files if f[0]]
    if not files:
        return skip("keys", "no key files configured (no TLS client key, no password file, updates off)")
    found = [p for p in (file_mode_problem(path, what, key) for path, what, key in files) if p is not None]
    names = ", ".join(f"{key} {path}" for path, _what, key in files)
    return worst("keys", found, f"{names}: present, mode 0600, owned by the agent's user")


@register("certificate")
def check_certificate(ctx) -> Check:
    from device import config

    lc = ctx.cfg.link
    files = [(p, what) for p, what in ((lc.cert_file, "client certificate"), (lc.ca_file, "CA file")) if p]
    if not files:
        return skip("certificate", "no TLS certificate configured (link.cert_file and link.ca_file are empty)")
    if not lc.broker:
        missing = [f"{what} {p}" for p, what in files if not os.path.lexists(p)]
        files = [(p, what) for p, what in files if os.path.lexists(p)]
        if not files:  # provisioned, not signed yet: nothing uses it while the link is off
            return skip("certificate", f"{' and '.join(missing)} not installed yet; the link is off (no "
                                       f"link.broker), so nothing needs it")
    found = []
    for path, what in files:
        found += _cert_findings(path, what, config.device_id(ctx.cfg) if what == "client certificate" else None)
    return worst("certificate", found, "")


def _cert_findings(path: str, what: str, device: str | None) -> list[Check]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = "certificate"
    try:
        with open(path, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
    except OSError as exc:
        return [fail(name, f"{what} {path}: cannot read it ({exc.strerror or exc})",
                     "check the file exists and is readable by the fieldnode user")]
    except ValueError as exc:
        return [fail(name, f"{what} {path}: not a PEM certificate ({exc})", f"replace {path} with the PEM file")]
    out = []
    now = datetime.datetime.now(datetime.timezone.utc)
    for cert in certs[:1] if device else certs:  # the leaf of a client chain; every CA of a bundle
        after = _aware(getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after)
        before = _aware(getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        subject = cn[0].value if cn else cert.subject.rfc4514_string()
        days = (after - now).total_seconds() / 86400
        label = f"{what} {path} ({subject})"
        if now < before:
            out.append(fail(name, f"{label} is not valid before {before:%Y-%m-%d %H:%M} UTC",
                            "check the clock (see the clock check), or the certificate was issued for the future"))
        elif days < 0:
            out.append(fail(name, f"{label} expired on {after:%Y-%m-%d} ({-days:.0f} days ago): TLS to the broker "
                                  f"fails", "issue a new certificate (fieldnode provision makes a CSR) and install it"))
        elif days < CERT_WARN_DAYS:
            out.append(warn(name, f"{label} expires on {after:%Y-%m-%d}, in {days:.0f} days",
                            "renew it before it expires: sign a new CSR (fieldnode provision) and install it"))
        else:
            out.append(ok(name, f"{label} valid until {after:%Y-%m-%d} ({days:.0f} days)"))
        if device and cn and subject != device:
            out.append(warn(name, f"{what} {path} is for {subject!r}, but this board is {device!r}: a broker that "
                                  f"binds topics to the certificate's name refuses this board's topics",
                            f"use the certificate issued for {device}, or set device.id to {subject}"))
    return out


def _aware(dt: datetime.datetime) -> datetime.datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=datetime.timezone.utc)


# -------------------------------------------------------------------------------------------------- clock


def build_floor() -> float:
    """The time this copy of fieldnode was built or installed (its files' time): a clock before it is wrong."""
    import device

    return os.stat(device.__file__).st_mtime


def clock_synced(timeout: float = 2.0) -> tuple[bool | None, str]:
    """Whether the system clock is NTP-synchronized: ``(True/False, how we know)``, or ``(None, why unknown)``."""
    tdc = which("timedatectl")
    if tdc:
        try:
            proc = subprocess.run([tdc, "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                                  text=True, timeout=timeout, check=False)
            value = proc.stdout.strip()
            if proc.returncode == 0 and value in ("yes", "no"):
                return value == "yes", "timedatectl"
        except (OSError, subprocess.SubprocessError):
            pass
    if os.path.exists("/run/systemd/timesync/synchronized"):
        return True, "systemd-timesyncd"
    if os.path.isdir("/run/systemd/timesync"):
        return False, "systemd-timesyncd (not synchronized yet)"
    return None, "no timedatectl answer and no systemd-timesyncd state"


@register("clock", needs_config=False)
def check_clock(ctx) -> Check:
    now, floor = ctx.clock.time(), build_floor()
    if now < floor - CLOCK_SLACK_S:
        return fail("clock", f"the clock reads {_utc(now)}, before this fieldnode was built or installed "
                             f"({_utc(floor)}): TLS certificates and signed commands are refused",
                    "set the time: timedatectl set-ntp true and let the board reach an NTP server (a board "
                    "without an RTC needs NTP or an RTC module)")
    synced, how = clock_synced(ctx.remaining(2.0))
    if synced is None:
        return skip("clock", f"{_utc(now)}, after the build date; whether it is synchronized is unknown ({how})")
    if not synced:
        return warn("clock", f"{_utc(now)}, not synchronized ({how})",
                    "timedatectl set-ntp true, and let the board reach an NTP server (UDP 123)")
    return ok("clock", f"{_utc(now)}, synchronized ({how})")


# -------------------------------------------------------------------------------------------------- trust


@register("trust")
def check_trust(ctx) -> Check:
    from device.link.envelope import TrustStore

    d = ctx.cfg.link.trust_dir
    if not ctx.cfg.link.broker and not os.path.isdir(d):
        return skip("trust", f"no link and no trust directory {d}: no signed commands to check")
    if not os.path.lexists(d):  # every new board: privileged commands stay refused until an operator adds a key
        return skip("trust", f"no trust directory {d}: signed commands (variant, governor, update) are refused "
                             f"until an operator's public key (NAME.pub) is copied into it")
    store = TrustStore(d)
    keys = ", ".join(sorted(name for name, _pub in store.keys.values())) or "none"
    found = []
    for p in store.problems:
        if "writable by every user" in p:
            found.append(fail("trust", p, f"chmod o-w {d} (and every key file in it)"))
        elif "cannot list" in p:
            found.append(warn("trust", p, f"create {d} and copy the operators' public keys (*.pub) into it"))
        else:
            found.append(warn("trust", p, f"replace or remove the file in {d} (fieldnode keys id shows a key)"))
    if not store.keys and not found:
        found.append(warn("trust", f"{d} holds no operator keys: signed commands (variant, governor, update) "
                                   f"are refused", f"copy an operator's public key (NAME.pub) into {d}"))
    return worst("trust", found, f"{d}: {len(store.keys)} operator key(s) ({keys})")


# ------------------------------------------------------------------------------------------- update store


@register("update_store")
def check_update_store(ctx) -> Check:
    from device.update.store.store import ModelStore
    from device.update.store.files import SlotRef, check_slot

    root = os.path.join(ctx.state_dir, "update")
    if not os.path.isdir(root):
        return skip("update_store", f"no update store in {ctx.state_dir} (nothing installed: the bundled model serves)")
    store = ModelStore(root, who="fieldnode diag")  # reads only: no lock, no recovery
    st = store.status()
    rerun = "restart the agent (it repairs the store at start); if it persists, fieldnode update rollback"
    found = [fail("update_store", p, rerun) for p in st["problems"]]
    for key, info in (("active", st.get("active")), ("fallback", st.get("fallback"))):
        if not info:
            continue
        slot_dir = os.path.join(store.slots_dir, info["slot"])
        why = check_slot(slot_dir, SlotRef(info["slot"], info["name"], info["version"]))
        if why:
            what = f"{key} slot {info['slot']} ({info['name']} v{info['version']}): {why}"
            found.append(fail("update_store", what, rerun) if key == "active" else
                         warn("update_store", what + "; a rollback would fall back to the bundled model", rerun))
    act = st.get("active")
    serving = f"{act['name']} v{act['version']} ({act.get('state')}, slot {act['slot']})" if act else "the bundled model"
    failed = sum(len(v) for v in st.get("failed", {}).values())
    return worst("update_store", found, f"serves {serving}; slots intact" + (f"; {failed} failed version(s) kept "
                                                                             f"out" if failed else ""))


# --------------------------------------------------------------------------------------------------- disk


@register("disk")
def check_disk(ctx) -> Check:
    from device.update.store.store import DEFAULT_RESERVE

    where = nearest_dir(ctx.state_dir)
    usage = shutil.disk_usage(where)
    free_pct = 100.0 * usage.free / usage.total if usage.total else 0.0
    budget = int(ctx.cfg.link.spool_max_mb * 1024 * 1024) if ctx.cfg.link.broker else 0
    need = budget + DEFAULT_RESERVE
    note = "" if where == os.path.abspath(ctx.state_dir) else \
        f" (state directory {ctx.state_dir} does not exist yet: the agent makes it at its first start)"
    detail = f"{human_bytes(usage.free)} free of {human_bytes(usage.total)} ({free_pct:.0f} %) on {where}{note}"
    if usage.free < need:
        return fail("disk", f"{detail}: less than the spool budget and the update reserve ({human_bytes(need)})",
                    f"free space on {where} (old logs: journalctl --vacuum-size=50M), or lower link.spool_max_mb")
    if free_pct < DISK_MIN_FREE_PCT:
        return warn("disk", f"{detail}: under {DISK_MIN_FREE_PCT:.0f} % free",
                    f"free space on {where} before updates and the spool need it (journalctl --vacuum-size=50M)")
    return ok("disk", detail)

