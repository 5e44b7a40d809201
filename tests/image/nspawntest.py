"""The systemd stage of the image test: the hardened unit under a real systemd, as PID 1 of an amd64 Debian
bookworm root booted with ``systemd-nspawn``, after ``fieldnode install --root`` put the agent there.

``make nspawn-test`` runs it (and ``make test``): ``python -m tests.image.nspawntest [--wheel FILE] [--cache DIR]``.

The root runs the agent on a virtual board (``drivers.virtual_board = "rpi4"``) against a mosquitto this test
starts on this machine (the container shares the network: no ``--private-network``), with an operator key in
``/etc/fieldnode/trust``. Its checks, in order, each through systemd (``systemctl``, ``journalctl``):

* the service reaches READY with its ``STATUS=`` line (``systemctl show -p StatusText``);
* ``systemctl status`` tells the three processes apart: ``fieldnode run``, ``fieldnode-fork``, ``fieldnode-infer``;
* the sandbox lets the agent do its job: results arrive at the broker; a governor command signed with the
  operator key is obeyed (so the agent read its trust key) and an unsigned one refused; the cpufreq cap is
  written through ``/sys/devices/system/cpu/cpufreq``, read-only to the service but for that tree
  (``ProtectKernelTunables=`` with ``ReadWritePaths=``), where a directory of this test is bound and made
  group-writable by the unit's own tmpfiles line at boot. The virtual board's ``scaling_max_freq`` in the state
  directory is a symlink to it, so the agent's write goes through the sandboxed path;
* ``systemctl reload`` with a good config (``reloaded: device.log_level``) and a bad one (the agent keeps
  running with the same pid; the refusal is in the journal at priority err and in a ``config_reload_failed``
  event naming the key);
* the watchdog: an inference worker frozen with SIGSTOP hangs the loop (``runtime.deadline_ms`` is 10 minutes
  here, so the agent waits for it rather than killing it); then the agent itself is SIGSTOPped. Each time the
  pings stop, systemd says ``Watchdog timeout``, restarts the service, and ``NRestarts`` grows. A drop-in sets
  ``WatchdogSec=8s`` and ``RestartSec=1s`` instead of 90 s and 5 s, to keep the stage short;
* the stop drain: ``systemctl stop`` returns well within ``TimeoutStopSec``, the agent exits 0 (``Result=success``)
  and publishes ``offline``.

Nothing is written to this machine's ``/run``, ``/etc`` or ``/var``: the run lives in a temporary directory of the
cache and a private mount namespace (``unshare --mount``), where the overlay root and a tmpfs over ``/run`` (nspawn
keeps its state in ``/run/systemd/nspawn``) are mounted. The container is stopped however the run ends (SIGTERM to
nspawn halts it; its init is SIGKILLed if it has not ended in 30 s), and nspawn dies with the test (parent-death
signal). The amd64 root (debootstrap with systemd) is cached beside the arm64 one, under the same lock.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests.image import imagetest
from tests.image.container import BOUND_S, Container, comm, descendants, die_with_parent, wait_for
from tests.image.imagetest import CHECKOUT, StepFailed, parse_image_args, run_step

ARCH = "amd64"
INCLUDE = "systemd,systemd-sysv,dbus,python3,python3-venv"
DEVICE = "nspawn-test"
UNIT = "fieldnode.service"
CPUFREQ = "sys/devices/system/cpu/cpufreq"
SENTINEL_KHZ = 1234567  # no frequency of the rpi4 profile: any write of the governor replaces it
WATCHDOG_S = 8
HANG_DEADLINE_MS = 600000
HOST_CLI = "import sys; from tools import cli; sys.exit(cli.main(sys.argv[1:]))"


def host_cli(argv: list[str], what: str, ok=(0,)) -> subprocess.CompletedProcess:
    """``fieldnode`` of the checkout, on this machine (the operator's side)."""
    return run_step([sys.executable, "-c", HOST_CLI] + argv, what, ok=ok, timeout=BOUND_S,
                    env=dict(os.environ, PYTHONPATH=CHECKOUT))


def board_ids(root: str) -> tuple[int, int]:
    """The uid and gid of ``fieldnode`` in the root (``install --root`` created the account)."""
    with open(os.path.join(root, "etc/passwd"), encoding="utf-8") as fh:
        for line in fh:
            f = line.split(":")
            if f[0] == "fieldnode":
                return int(f[2]), int(f[3])
    raise StepFailed("install --root created no fieldnode account in the root's /etc/passwd")


def config_text(broker_url: str, log_level: str = "info") -> str:
    """The board's config: a virtual Pi 4, the test's broker, and an inference deadline long enough that a
    frozen worker hangs the loop (with the default 5 s the agent kills the worker itself)."""
    return (f'[device]\nid = "{DEVICE}"\nlog_level = "{log_level}"\n\n[drivers]\nvirtual_board = "rpi4"\n\n'
            f'[link]\nbroker = "{broker_url}"\n\n[runtime]\ndeadline_ms = {HANG_DEADLINE_MS}\n')


def prepare_root(root: str, run_dir: str, broker_url: str) -> dict:
    """What ``install --root`` leaves to the deployment: the config, an operator key, the test's drop-in, and
    the cpufreq tree bound at ``/sys/devices/system/cpu/cpufreq``. Returns paths the checks use."""
    keys = os.path.join(run_dir, "keys")
    host_cli(["keys", "generate", "operator", "--out", keys], "fieldnode keys generate operator")
    trust = os.path.join(root, "etc/fieldnode/trust")
    os.makedirs(trust, exist_ok=True)
    shutil.copyfile(os.path.join(keys, "operator.pub"), os.path.join(trust, "operator.pub"))
    os.chmod(os.path.join(trust, "operator.pub"), 0o644)
    config = os.path.join(root, "etc/fieldnode/fieldnode.toml")
    write_config(config, config_text(broker_url))
    dropin = os.path.join(root, "etc/systemd/system/fieldnode.service.d")
    os.makedirs(dropin, exist_ok=True)
    with open(os.path.join(dropin, "image-test.conf"), "w", encoding="utf-8") as fh:
        fh.write(f"# The image test's only change to the unit: a short watchdog and restart delay.\n"
                 f"[Service]\nWatchdogSec={WATCHDOG_S}s\nRestartSec=1s\n")
    # The "kernel's" cpufreq tree: root-owned 0644 like sysfs; the unit's tmpfiles line opens it at boot.
    cpufreq = os.path.join(run_dir, "cpufreq")
    cap = os.path.join(cpufreq, "policy0", "scaling_max_freq")
    os.makedirs(os.path.dirname(cap))
    with open(cap, "w", encoding="utf-8") as fh:
        fh.write(f"{SENTINEL_KHZ}\n")
    os.chmod(cap, 0o644)
    # The virtual board lives in the state directory; its cap node is the sandboxed one.
    uid, gid = board_ids(root)
    board_dir = f"var/lib/fieldnode/board/{CPUFREQ}/policy0"
    path = root
    for part in board_dir.split("/"):
        path = os.path.join(path, part)
        os.makedirs(path, exist_ok=True)
        if part != "var" and part != "lib":
            os.chown(path, uid, gid)
    os.symlink(f"/{CPUFREQ}/policy0/scaling_max_freq", os.path.join(path, "scaling_max_freq"))
    return {"config": config, "key": os.path.join(keys, "operator.key"), "cap": cap, "cpufreq": cpufreq,
            "gid": gid}


def write_config(path: str, text: str) -> None:
    """Replaces the config whole, as a config manager would."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class Watch:
    """A subscriber on the test's broker: everything the board publishes."""

    def __init__(self, broker):
        import paho.mqtt.client as mqtt

        self.seen: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="nspawn-test-watch")
        self.client.on_message = lambda c, u, m: self.seen.append((m.topic, m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"fieldnode/v1/{DEVICE}/#", qos=1)
        self.client.loop_start()

    def results(self) -> int:
        return sum(t.startswith(f"fieldnode/v1/{DEVICE}/results/") for t, _ in list(self.seen))

    def states(self) -> list:
        return [_json(p).get("state") for t, p in list(self.seen) if t == f"fieldnode/v1/{DEVICE}/state"]

    def events(self, kind: str) -> list[dict]:
        found = []
        for t, p in list(self.seen):
            if t == f"fieldnode/v1/{DEVICE}/events" and kind.encode() in p:
                found.append(_json(p))
        return found

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _json(payload: bytes) -> dict:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -------------------------------------------------------------------------------------------------- checks


def step_ready(c: Container) -> str:
    def ready():
        s = c.show("ActiveState", "SubState", "StatusText", "MainPID")
        if s.get("ActiveState") == "failed":
            raise StepFailed(f"{UNIT} failed: {s}\n{c.tail()}")
        return s if s.get("ActiveState") == "active" and s.get("StatusText") else None

    s = wait_for(ready, f"READY=1 with a STATUS= line from {UNIT}", c.tail, timeout=180)
    return f"active ({s['SubState']}), MainPID {s['MainPID']}, StatusText: {s['StatusText']}"


def step_processes(c: Container) -> str:
    names = {"agent": "fieldnode run", "zygote": "fieldnode-fork", "worker": "fieldnode-infer"}

    def tree():
        out = c.sh(["systemctl", "status", UNIT, "--no-pager", "-l", "-n", "0"], "systemctl status", ok=range(256))
        lines = [line for line in out.stdout.splitlines() if re.search(r"[─└├]\s*\d+ ", line)]
        found = {part: [line.strip() for line in lines if name in line] for part, name in names.items()}
        return (found, out.stdout) if all(len(v) == 1 for v in found.values()) and len(lines) == 3 else None

    try:
        found, _ = wait_for(tree, "three processes told apart in systemctl status", timeout=10)
    except StepFailed:
        out = c.sh(["systemctl", "status", UNIT, "--no-pager", "-l", "-n", "0"], "systemctl status", ok=range(256))
        pids = re.findall(r"[─└├]\s*(\d+) ", out.stdout)
        comms = c.sh(["sh", "-c", " ".join(f"echo {p} $(cat /proc/{p}/comm);" for p in pids)], "comm",
                     ok=range(256)).stdout.split("\n")
        raise StepFailed(f"systemctl status does not show one process each named {list(names.values())}; it prints "
                         f"command lines, while the names are only in /proc/PID/comm ({', '.join(filter(None, comms))})"
                         f":\n{out.stdout}") from None
    return "; ".join(f"{part}: {lines[0]}" for part, lines in found.items())


def step_results(watch: Watch) -> str:
    wait_for(lambda: "online" in watch.states() and watch.results() > 0, "results at this machine's broker",
             lambda: f"states {watch.states()}, topics {sorted({t for t, _ in watch.seen})}")
    return f"state online, {watch.results()} results so far"


def step_sandbox_writes(c: Container, paths: dict, broker_url: str) -> str:
    cap = paths["cap"]

    def cap_value() -> int:
        with open(cap, encoding="utf-8") as fh:
            return int(fh.read().strip() or 0)

    st = os.stat(cap)
    if (st.st_mode & 0o777, st.st_gid) != (0o664, paths["gid"]):
        raise StepFailed(f"the tmpfiles line did not open scaling_max_freq at boot: mode {st.st_mode & 0o777:o}, "
                         f"gid {st.st_gid} (fieldnode is {paths['gid']})")

    def written() -> int:
        refused = re.findall(r"cannot cap the CPU frequency.*", c.journal())
        if refused:
            raise StepFailed(f"the sandbox refused the cap: {refused[0]}")
        return cap_value() != SENTINEL_KHZ and cap_value()

    first = wait_for(written, "cpufreq cap written by the governor", c.tail, every=0.5)
    send = ["send", "governor", "--args", json.dumps({"level": "critical", "ttl_s": 600}), "--broker", broker_url,
            "--device", DEVICE, "--json", "--timeout", "30"]
    unsigned = host_cli(send, "fieldnode send governor (unsigned)", ok=range(256))
    if unsigned.returncode == 0:
        raise StepFailed(f"an unsigned governor command was obeyed:\n{unsigned.stdout}")
    signed = host_cli(send + ["--sign", paths["key"]], "fieldnode send governor --sign operator.key", ok=range(256))
    if signed.returncode != 0:
        raise StepFailed(f"the signed governor command was refused (exit {signed.returncode}): "
                         f"{signed.stdout}{signed.stderr}\n{c.tail()}")
    capped = wait_for(lambda: cap_value() < first and cap_value(), "a lower cap after the signed override",
                      lambda: f"cap {cap_value()}\n{c.tail()}")
    refused = re.findall(r"cannot cap the CPU frequency.*", c.journal())
    if refused:
        raise StepFailed(f"the agent could not write the cap: {refused[0]}")
    why = (_json(unsigned.stdout.encode()).get("error") or {}).get("code", unsigned.stdout.strip()[:120])
    return (f"cap {first} kHz written at start, {capped} kHz after a signed governor override (unsigned one "
            f"refused: {why}); scaling_max_freq 0664 root:fieldnode from the tmpfiles line")


def step_reload(c: Container, paths: dict, broker_url: str, watch: Watch) -> str:
    pid = c.show("MainPID")["MainPID"]
    write_config(paths["config"], config_text(broker_url, log_level="debug"))
    c.sh(["systemctl", "reload", UNIT], "systemctl reload (good config)")
    wait_for(lambda: c.journal().count("reloaded: device.log_level") >= 1, "'reloaded: device.log_level'", c.tail)
    write_config(paths["config"], config_text(broker_url, log_level="loud"))
    bad = c.sh(["systemctl", "reload", UNIT], "systemctl reload (bad config)", ok=range(256))
    wait_for(lambda: "reload refused, nothing changed" in c.journal("-p", "err"),
             "the refused reload in the journal at priority err", c.tail)
    event = wait_for(lambda: watch.events("config_reload_failed"), "a config_reload_failed event", c.tail)
    line = re.search(r"reload refused, nothing changed.*", c.journal("-p", "err")).group(0)
    after = c.show("ActiveState", "MainPID")
    if after != {"ActiveState": "active", "MainPID": pid}:
        raise StepFailed(f"the bad config did not leave the agent running as pid {pid}: {after}\n{c.tail()}")
    write_config(paths["config"], config_text(broker_url))
    c.sh(["systemctl", "reload", UNIT], "systemctl reload (config restored)")
    wait_for(lambda: c.journal().count("reloaded: device.log_level") >= 2, "the restoring reload", c.tail)
    key = (event[-1].get("data") or event[-1]).get("key", event[-1])
    return (f"good: 'reloaded: device.log_level', same pid {pid}; bad: systemctl reload exits {bad.returncode}, "
            f"agent still pid {pid}, journal (err): '{line[:160]}', event config_reload_failed key {key}")


def _restarted(c: Container, before: int, what: str) -> dict:
    def again():
        s = c.show("NRestarts", "ActiveState", "MainPID", "StatusText")
        return s if int(s.get("NRestarts") or 0) > before and s["ActiveState"] == "active" and s["StatusText"] else None

    return wait_for(again, f"a restart by the watchdog ({what})", c.tail, timeout=BOUND_S)


def step_watchdog_worker(c: Container) -> str:
    s = c.show("NRestarts", "MainPID")
    before, timeouts = int(s["NRestarts"]), c.journal().count("Watchdog timeout")
    workers = [p for p in descendants(c.init_pid) if comm(p) == "fieldnode-infer"]
    if len(workers) != 1:
        raise StepFailed(f"expected one fieldnode-infer process in the container, found {workers}")
    start = time.monotonic()
    os.kill(workers[0], signal.SIGSTOP)  # a hung inference for real: the loop waits (deadline_ms is 10 min)
    after = _restarted(c, before, "frozen inference worker")
    took = time.monotonic() - start
    journal = c.journal()
    if journal.count("Watchdog timeout") <= timeouts or "watchdog: not pinging, no progress in loop" not in journal:
        raise StepFailed(f"restarted, but not by the watchdog on the hung loop:\n{c.tail()}")
    return (f"pings stopped ('no progress in loop'), 'Watchdog timeout', restarted in {took:.0f} s: NRestarts "
            f"{before} -> {after['NRestarts']}, MainPID {s['MainPID']} -> {after['MainPID']}")


def step_watchdog_agent(c: Container) -> str:
    s = c.show("NRestarts", "MainPID")
    before, timeouts = int(s["NRestarts"]), c.journal().count("Watchdog timeout")
    start = time.monotonic()
    c.sh(["systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", UNIT], "systemctl kill --signal=SIGSTOP")
    after = _restarted(c, before, "SIGSTOPped agent")
    took = time.monotonic() - start
    if c.journal().count("Watchdog timeout") <= timeouts:
        raise StepFailed(f"restarted, but not by the watchdog:\n{c.tail()}")
    return (f"'Watchdog timeout', restarted in {took:.0f} s: NRestarts {before} -> {after['NRestarts']}, MainPID "
            f"{s['MainPID']} -> {after['MainPID']}")


def step_stop(c: Container, watch: Watch) -> str:
    seen = len(watch.states())
    start = time.monotonic()
    c.sh(["systemctl", "stop", UNIT], "systemctl stop", timeout=60)
    took = time.monotonic() - start
    s = c.show("ActiveState", "Result", "ExecMainStatus")
    if s != {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}:
        raise StepFailed(f"after systemctl stop: {s}\n{c.tail()}")
    wait_for(lambda: "offline" in watch.states()[seen:], "state offline at the broker after the stop",
             lambda: f"states {watch.states()}")
    journal = c.journal()
    stop = journal[journal.rindex("Stopping fieldnode.service"):] if "Stopping fieldnode.service" in journal else ""
    missing = [m for m in ("Stopping fieldnode.service", "Deactivated successfully", "Stopped fieldnode.service")
               if m not in stop]
    # A drain that systemd had to finish: a stop timeout, or processes (the zygote, a worker) left to SIGKILL.
    forced = [line for line in stop.splitlines() if re.search(r"timed out|Killing process|SIGKILL|remain", line)]
    if missing or forced:
        raise StepFailed(f"the journal does not show a clean drain (missing {missing}, forced {forced}):\n"
                         f"{journal[-3000:]}")
    return (f"systemctl stop returned in {took:.1f} s, exit 0, offline published, nothing left to kill; journal: "
            + " | ".join(line for line in stop.splitlines() if line.strip()))


# ------------------------------------------------------------------------------------------------ the run


def check_tools() -> None:
    missing = [t for t in ("debootstrap", "systemd-nspawn", "nsenter", "chroot", "mount")
               if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        raise StepFailed(f"missing {', '.join(missing)}: apt-get install systemd-container debootstrap")


def inside(args) -> int:
    """The stage proper, in the private mount namespace (the parent removes ``run_dir`` afterwards)."""
    from tests.link.broker import Broker

    timings: dict = {}
    total = time.monotonic()
    step = "tools"
    container = broker = watch = None
    failed: list[str] = []
    try:
        check_tools()
        step = "debootstrap"
        lower = imagetest.base_root(args.cache, timings, ARCH, INCLUDE)
        step = "wheel"
        wheel = args.wheel or imagetest.build_wheel(args.run_dir)
        step = "overlay"
        root = imagetest.mount_image(lower, args.run_dir, args.cache)
        step = "fieldnode install --root"
        start = time.monotonic()
        proc = run_step([sys.executable, "-c", imagetest.CLI, "install", "--root", root, "--wheel", wheel], step,
                    env=dict(os.environ, PYTHONPATH=CHECKOUT))
        timings["install"] = f"{time.monotonic() - start:.0f} s"
        print(proc.stdout.rstrip(), flush=True)
        step = "broker"
        broker = Broker(os.path.join(args.run_dir, "broker"), "plain").start()
        watch = Watch(broker)
        step = "config, keys, cpufreq"
        paths = prepare_root(root, args.run_dir, broker.url)
        step = "boot"
        start = time.monotonic()
        container = Container(root, args.run_dir, [(paths["cpufreq"], f"/{CPUFREQ}")], DEVICE, UNIT)
        container.boot()
        timings[step] = f"{time.monotonic() - start:.1f} s"
        c = container
        step = "READY"
        start = time.monotonic()
        print(f"nspawn test: {step}: {step_ready(c)} ({time.monotonic() - start:.1f} s)", flush=True)
        # From here on a failed check is reported and the next one still runs (each starts from a running
        # service), so one defect does not hide another; the stage then fails.
        for step, fn in (("three processes", lambda: step_processes(c)),
                         ("results at the broker", lambda: step_results(watch)),
                         ("sandbox: keys and cpufreq", lambda: step_sandbox_writes(c, paths, broker.url)),
                         ("reload", lambda: step_reload(c, paths, broker.url, watch)),
                         ("watchdog: hung inference", lambda: step_watchdog_worker(c)),
                         ("watchdog: SIGSTOPped agent", lambda: step_watchdog_agent(c)),
                         ("stop drain", lambda: step_stop(c, watch))):
            start = time.monotonic()
            try:
                step_ready(c)
                outcome = fn()
            except StepFailed as exc:
                failed.append(step)
                print(f"nspawn test FAILED at {step}: {exc}", file=sys.stderr, flush=True)
                continue
            timings[step] = f"{time.monotonic() - start:.1f} s"
            print(f"nspawn test: {step}: {outcome} ({timings[step]})", flush=True)
    except (StepFailed, Interrupted) as exc:
        print(f"nspawn test FAILED at {step}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if container is not None:
            container.stop()
        if watch is not None:
            watch.close()
        if broker is not None:
            broker.stop()
    timings["total"] = f"{time.monotonic() - total:.0f} s"
    if failed:
        print(f"nspawn test FAILED: {', '.join(failed)}; " + ", ".join(f"{k} {v}" for k, v in timings.items()),
              file=sys.stderr, flush=True)
        return 1
    print(f"nspawn test: passed under systemd {systemd_version(root)} (amd64 Debian {imagetest.SUITE}, "
          f"systemd-nspawn); " + ", ".join(f"{k} {v}" for k, v in timings.items()), flush=True)
    return 0


def systemd_version(root: str) -> str:
    found = subprocess.run(["chroot", root, "dpkg-query", "-W", "-f", "${Version}", "systemd"], capture_output=True,
                           text=True, check=False).stdout.strip()
    return found or "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_image_args(argv, "install fieldnode into an amd64 Debian root and check its systemd unit under a "
                                  "real systemd (systemd-nspawn)")
    if args.run_dir:
        signal.signal(signal.SIGTERM, _interrupted)  # the finally of inside() stops the container
        hold_run_lock(args.run_dir)
        return inside(args)
    if os.geteuid() != 0:
        print("nspawn test FAILED at tools: needs root (debootstrap, mounts, systemd-nspawn): run it as root",
              file=sys.stderr)
        return 1
    os.makedirs(args.cache, exist_ok=True)
    if args.prepare:
        timings: dict = {}
        try:
            root = imagetest.base_root(args.cache, timings, ARCH, INCLUDE)
        except StepFailed as exc:
            print(f"nspawn test FAILED at debootstrap: {exc}", file=sys.stderr)
            return 1
        print(f"nspawn test: root ready in {root} (debootstrap {timings['debootstrap']})", flush=True)
        return 0
    sweep_stale_runs(args.cache)
    run_dir = tempfile.mkdtemp(prefix="nspawn-", dir=args.cache)
    lock = hold_run_lock(run_dir)
    proc = None
    try:
        child = [sys.executable, "-m", "tests.image.nspawntest", "--cache", args.cache, "--run-dir", run_dir] + \
            (["--wheel", args.wheel] if args.wheel else [])
        # Every mount of the run (the overlay, the private /run) is made in this namespace and goes with it.
        # unshare executes the child in its own place, so the child gets SIGTERM if this process dies, and a
        # SIGTERM here is passed on: either way the child stops the container before it ends.
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--"] + child, cwd=CHECKOUT,
                                preexec_fn=die_with_parent)
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        return proc.wait()
    finally:
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(90)  # an interrupted child is stopping its container
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
        os.close(lock)


def hold_run_lock(run_dir: str) -> int:
    """A shared lock on ``run_dir/run.lock`` while this process lives: the test and its namespaced child both
    hold it, so a run directory nobody holds is one whose run was killed."""
    fd = os.open(os.path.join(run_dir, "run.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def sweep_stale_runs(cache: str) -> None:
    """Removes the run directories of runs that were killed (SIGKILL leaves no chance to clean up)."""
    for run_dir in glob.glob(os.path.join(cache, "nspawn-*")):
        try:
            fd = os.open(os.path.join(run_dir, "run.lock"), os.O_RDONLY)
        except OSError:
            continue  # no lock yet: a run that is just starting
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a run in progress
        finally:
            os.close(fd)
        shutil.rmtree(run_dir, ignore_errors=True)


class Interrupted(BaseException):
    """SIGTERM: not a failed check (the loop goes on after those), the end of the run."""


def _interrupted(signum, frame) -> None:
    raise Interrupted(f"interrupted by signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
