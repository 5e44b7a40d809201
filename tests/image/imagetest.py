"""The image test, the closest thing to a board here: an arm64 Debian bookworm root (the base of 64-bit Raspberry
Pi OS), ``fieldnode install --root`` into it, then, chrooted under qemu-user as a Raspberry Pi 4 core
(Cortex-A72), ``fieldnode selftest``, ``fieldnode diag --sim`` and a short ``fieldnode run --sim`` against a
mosquitto on this machine (a chroot shares the network).

``make image-test`` runs it (and ``make test``): ``python -m tests.image.imagetest [--wheel FILE] [--cache DIR]``.

* The base root is made by ``debootstrap --arch=arm64 --variant=minbase`` from the Debian mirror apt uses here
  (``IMAGE_MIRROR`` overrides) and cached in ``--cache`` (``FIELDNODE_IMAGE_CACHE``, default
  ``~/.cache/fieldnode-image``) under a key of the debootstrap arguments. It is never written to: each run
  mounts an overlay on it, so every run starts from the same fresh image.
* Everything mounted (the overlay, ``/proc``, ``/dev/pts``, ``/dev/shm``, pip's download cache) lives in a
  private mount namespace (``unshare --mount``) that dies with the run, so nothing outlives it on the host.
* Emulation traps (measured): qemu-user passes this machine's x86 ``/proc/cpuinfo`` through and LiteRT then
  segfaults, so an ARM one (Cortex-A72: implementer 0x41, part 0xd08) is bound over it; qemu's default ``max``
  CPU advertises SME and XNNPACK's int8 results come out wrong, so ``QEMU_CPU=cortex-a72``.

Each step prints its time; the first that fails prints ``image test FAILED at <step>: <why>`` with the output of
what failed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = "bookworm"
ARCH = "arm64"
INCLUDE = "python3,python3-venv,python3-pip,ca-certificates"
QEMU_CPU = "cortex-a72"
PREFIX = "/opt/fieldnode"
RUN_SECONDS = 10
# What a Raspberry Pi 4's kernel shows (4 Cortex-A72 cores), for the runtimes that read it.
CPUINFO_CORE = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
                "CPU revision\t: 3\n\n")
CPUINFO_TAIL = "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
# The installed command, registering `install` for a fieldnode whose CLI does not list it yet.
CLI = ("import sys; from tools import cli; 'install' in cli.COMMANDS or cli._lazy('tools.install.cli', 'install', "
       "'install'); sys.exit(cli.main(sys.argv[1:]))")


class StepFailed(Exception):
    pass


def run_step(argv: list[str], what: str, *, env: dict | None = None, ok=(0,),
             timeout: float = 1800) -> subprocess.CompletedProcess:
    """Runs one command of a step; :class:`StepFailed` with its output when it fails or exits outside ``ok``."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StepFailed(f"{what}: {exc}") from exc
    if proc.returncode not in ok:
        raise StepFailed(f"{what} exited {proc.returncode}\n--- output ---\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    return proc


# ------------------------------------------------------------------------------------------ the base root


def apt_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 ``.sources`` or one-line ``.list`` entries)."""
    if os.environ.get("IMAGE_MIRROR"):
        return os.environ["IMAGE_MIRROR"]
    texts = []
    for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*")):
        try:
            with open(path, encoding="utf-8") as fh:
                texts.append((path, fh.read()))
        except OSError:
            continue
    for path, text in texts:
        if path.endswith(".sources"):
            for block in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", block, re.MULTILINE))
                if "deb" in fields.get("Types", "").split() and "main" in fields.get("Components", "").split() \
                        and any(s in (SUITE, "stable") for s in fields.get("Suites", "").split()):
                    return fields["URIs"].split()[0]
        else:
            for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", text, re.MULTILINE):
                if m.group(2) in (SUITE, "stable") and "main" in m.group(3).split():
                    return m.group(1)
    raise StepFailed("no Debian mirror found in apt's sources: set IMAGE_MIRROR to the URL of a Debian mirror")


def base_root(cache: str, timings: dict, arch: str = ARCH, include: str = INCLUDE) -> str:
    """The cached debootstrap root for these arguments, made when missing (into a temporary directory that is
    renamed when complete, so a cut-short build is never taken for a root). One build at a time: a second
    caller (``make test`` prepares the roots beside the unit tests) waits for the first and takes its root.
    The amd64 root the systemd stage boots (``tests/image/nspawntest.py``) is made here too."""
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "build.lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _base_root(cache, timings, arch, include)


def _base_root(cache: str, timings: dict, arch: str, include: str) -> str:
    mirror = apt_mirror()
    argv = ["debootstrap", f"--arch={arch}", "--variant=minbase", f"--include={include}", SUITE]
    key = hashlib.sha256(" ".join(argv + [mirror]).encode()).hexdigest()[:12]
    final = os.path.join(cache, f"{SUITE}-{arch}-{key}")
    if os.path.isfile(os.path.join(final, "complete")):
        timings["debootstrap"] = "cached"
        return os.path.join(final, "root")
    os.makedirs(cache, exist_ok=True)
    for stale in glob.glob(f"{final}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    building = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp", dir=cache)
    print(f"image test: building the {SUITE} {arch} root with debootstrap from {mirror} (cached in {final})",
          flush=True)
    start = time.monotonic()
    run_step(argv + [os.path.join(building, "root"), mirror], "debootstrap")
    with open(os.path.join(building, "complete"), "w", encoding="utf-8") as fh:
        fh.write(" ".join(argv + [mirror]) + "\n")
    os.rename(building, final)
    timings["debootstrap"] = f"{time.monotonic() - start:.0f} s"
    return os.path.join(final, "root")


# --------------------------------------------------------------------------------- inside the namespace


def check_tools() -> None:
    missing = [t for t in ("debootstrap", "chroot", "mount", "qemu-aarch64-static")
               if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        raise StepFailed(f"missing {', '.join(missing)}: apt-get install qemu-user-static binfmt-support debootstrap")
    if not os.path.exists("/proc/sys/fs/binfmt_misc/status"):
        run_step(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], "mounting binfmt_misc")
    handler = "/proc/sys/fs/binfmt_misc/qemu-aarch64"
    if not os.path.exists(handler) or "enabled" not in open(handler, encoding="utf-8").read():
        run_step(["update-binfmts", "--enable", "qemu-aarch64"], "update-binfmts --enable qemu-aarch64")
    with open(handler, encoding="utf-8") as fh:
        flags = re.search(r"^flags: (\S*)", fh.read(), re.MULTILINE)
    if not flags or "F" not in flags.group(1):
        raise StepFailed("the qemu-aarch64 binfmt handler lacks the F flag, so it cannot run inside a chroot: "
                         "reinstall qemu-user-static")


def mount_image(lower: str, run_dir: str, cache: str) -> str:
    """The overlay root on the cached one, with pip's settings and download cache, ready for the install."""
    merged, upper, work = (os.path.join(run_dir, d) for d in ("root", "upper", "work"))
    for d in (merged, upper, work):
        os.makedirs(d)
    run_step(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", merged],
         "mounting the overlay root")
    sys.path.insert(0, CHECKOUT)
    from tests.image import pipsettings

    pipsettings.copy_into(merged)
    # pip's downloads (aarch64 wheels) kept between runs; the install itself is what the test times.
    pip_cache = os.path.join(cache, "pip-cache")
    os.makedirs(pip_cache, exist_ok=True)
    os.makedirs(os.path.join(merged, "root/.cache/pip"), exist_ok=True)
    run_step(["mount", "--bind", pip_cache, os.path.join(merged, "root/.cache/pip")], "binding pip's cache")
    return merged


def mount_board(root: str, run_dir: str) -> None:
    """``/proc`` with an ARM cpuinfo over it, a private ``/dev/pts`` (the simulated sensor is a pty) and
    ``/dev/shm`` (the inference worker's shared memory)."""
    cpuinfo = os.path.join(run_dir, "cpuinfo")
    with open(cpuinfo, "w", encoding="utf-8") as fh:
        fh.write("".join(CPUINFO_CORE.format(n=n) for n in range(4)) + CPUINFO_TAIL)
    for argv, what in (
        (["mount", "-t", "proc", "proc", f"{root}/proc"], "mounting /proc"),
        (["mount", "--bind", cpuinfo, f"{root}/proc/cpuinfo"], "binding an ARM /proc/cpuinfo"),
        (["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", f"{root}/dev/pts"], "mounting /dev/pts"),
        (["mount", "--bind", f"{root}/dev/pts/ptmx", f"{root}/dev/ptmx"], "binding /dev/ptmx"),
        (["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", f"{root}/dev/shm"], "mounting /dev/shm"),
    ):
        run_step(argv, what)


def on_board(root: str, argv: list[str], what: str, ok=(0,), timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs the installed ``fieldnode`` in the root as a Pi 4 would: emulated Cortex-A72, a clean environment."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "QEMU_CPU": QEMU_CPU}
    return run_step(["chroot", root, f"{PREFIX}/venv/bin/fieldnode"] + argv, what, env=env, ok=ok, timeout=timeout)


def step_selftest(root: str) -> str:
    proc = on_board(root, ["selftest", "--json"], "fieldnode selftest (emulated Cortex-A72)")
    report = json.loads(proc.stdout)
    if not report.get("ok") or not report.get("variants"):
        raise StepFailed(f"fieldnode selftest did not pass on the emulated Cortex-A72:\n{proc.stdout}")
    return ", ".join(f"{v['variant']} PASS" for v in report["variants"])


def step_diag(root: str) -> str:
    probe = on_board(root, ["diag", "--help"], "fieldnode diag --help", ok=range(256))
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        why = "the installed fieldnode has no diag command" if "invalid choice: 'diag'" in last else last[:200]
        return f"SKIP: `fieldnode diag --help` exits {probe.returncode} in the image: {why}"
    proc = on_board(root, ["diag", "--sim", "--json"], "fieldnode diag --sim", ok=(0, 5, 6))  # OK, WARN, FAULTS
    try:
        checks = json.loads(proc.stdout)["checks"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StepFailed(f"fieldnode diag --sim --json printed no checks ({exc}):\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-2000:]}") from exc
    failed = [c for c in checks if c.get("status") == "FAIL"]
    if failed or proc.returncode == 2:
        raise StepFailed("fieldnode diag --sim found failures on the emulated board:\n" + "\n".join(
            f"  {c.get('name')}: {c.get('detail')} (remedy: {c.get('remedy')})" for c in failed))
    counts = {s: sum(c.get("status") == s for c in checks) for s in ("OK", "WARN", "SKIP")}
    warned = ", ".join(c.get("name", "?") for c in checks if c.get("status") == "WARN")
    return f"exit {proc.returncode}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + \
        (f" (WARN: {warned})" if warned else "")


def step_run(root: str, run_dir: str) -> str:
    """``fieldnode run --sim`` for a few seconds against a mosquitto on this machine, watched by a subscriber."""
    sys.path.insert(0, CHECKOUT)
    import paho.mqtt.client as mqtt

    from tests.link.broker import Broker

    broker = Broker(os.path.join(run_dir, "broker"), "plain").start()
    seen: list[tuple[str, bytes]] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="image-test-watch")
    sub.on_message = lambda c, u, m: seen.append((m.topic, m.payload))
    try:
        sub.connect(broker.host, broker.port)
        sub.subscribe("fieldnode/v1/#", qos=1)
        sub.loop_start()
        with open(os.path.join(root, "etc/fieldnode/image-test.toml"), "w", encoding="utf-8") as fh:
            fh.write(f'[device]\nid = "image-test"\nstate_dir = "/var/lib/fieldnode-image-test"\n\n'
                     f'[link]\nbroker = "{broker.url}"\n')
        proc = on_board(root, ["--config", "/etc/fieldnode/image-test.toml", "run", "--sim",
                               "--seconds", str(RUN_SECONDS)], f"fieldnode run --sim --seconds {RUN_SECONDS}",
                        timeout=300)
        time.sleep(1.0)
    finally:
        sub.loop_stop()
        sub.disconnect()
        broker.stop()
    topics = [t for t, _ in seen]
    states = [json.loads(p).get("state") for t, p in seen if t == "fieldnode/v1/image-test/state"]
    results = sum(t.startswith("fieldnode/v1/image-test/results/") for t in topics)
    if "online" not in states or states[-1:] != ["offline"] or results == 0:
        raise StepFailed(f"fieldnode run --sim against the broker: states {states}, {results} results, topics "
                         f"{sorted(set(topics))}\n--- agent log ---\n{proc.stderr[-4000:]}")
    return f"exit 0, state online then offline, {results} results, {len(topics)} messages on {broker.url}"


def inside(args) -> int:
    """The test proper, in the private mount namespace (the parent removes ``run_dir`` afterwards)."""
    timings: dict = {}
    total = time.monotonic()
    step = "tools"
    try:
        check_tools()
        step = "debootstrap"
        lower = base_root(args.cache, timings)
        step = "wheel"
        wheel = args.wheel or build_wheel(args.run_dir)
        step = "overlay"
        root = mount_image(lower, args.run_dir, args.cache)
        step = "fieldnode install --root"
        start = time.monotonic()
        proc = run_step([sys.executable, "-c", CLI, "install", "--root", root, "--wheel", wheel], step,
                    env=dict(os.environ, PYTHONPATH=CHECKOUT))
        timings["install (venv + pip, emulated)"] = f"{time.monotonic() - start:.0f} s"
        print(proc.stdout.rstrip(), flush=True)
        mount_board(root, args.run_dir)
        for step, fn in (("fieldnode selftest", lambda: step_selftest(root)),
                         ("fieldnode diag --sim", lambda: step_diag(root)),
                         (f"fieldnode run --sim --seconds {RUN_SECONDS}", lambda: step_run(root, args.run_dir))):
            start = time.monotonic()
            outcome = fn()
            timings[step] = f"{time.monotonic() - start:.0f} s"
            print(f"image test: {step}: {outcome} ({timings[step]})", flush=True)
    except StepFailed as exc:
        print(f"image test FAILED at {step}: {exc}", file=sys.stderr, flush=True)
        return 1
    timings["total"] = f"{time.monotonic() - total:.0f} s"
    print("image test: passed on an emulated Raspberry Pi 4 (arm64 Debian bookworm, QEMU_CPU=cortex-a72); " +
          ", ".join(f"{k} {v}" for k, v in timings.items()), flush=True)
    return 0


def build_wheel(run_dir: str) -> str:
    """The wheel of the checkout, built into ``run_dir`` (:class:`StepFailed` when it does not build)."""
    sys.path.insert(0, CHECKOUT)
    from tests import wheelcheck

    try:
        return wheelcheck.build_wheel(os.path.join(run_dir, "wheel"), wheelcheck.source_files())
    except wheelcheck.CheckFailed as exc:
        raise StepFailed(str(exc)) from exc


def parse_image_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """The options every image stage takes (this one and tests/image/nspawntest.py), with absolute paths."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--wheel", help="the wheel to install (default: build one from the checkout)")
    parser.add_argument("--cache", default=os.environ.get("FIELDNODE_IMAGE_CACHE")
                        or os.path.expanduser("~/.cache/fieldnode-image"),
                        help="where the debootstrap roots and pip's downloads are kept between runs")
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)  # set by the parent for the namespaced child
    parser.add_argument("--prepare", action="store_true",
                        help="only build (or find) the cached debootstrap root, e.g. while other tests run")
    args = parser.parse_args(argv)
    args.cache = os.path.abspath(args.cache)
    if args.wheel:
        args.wheel = os.path.abspath(args.wheel)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_image_args(argv, "install fieldnode into an arm64 Debian root and run it under qemu-user as a "
                                  "Raspberry Pi 4")
    if args.run_dir:
        return inside(args)
    if os.geteuid() != 0:
        print("image test FAILED at tools: needs root (debootstrap, chroot and mounts): run it as root",
              file=sys.stderr)
        return 1
    os.makedirs(args.cache, exist_ok=True)
    if args.prepare:
        timings: dict = {}
        try:
            check_tools()  # debootstrap's second stage runs arm64 programs: the binfmt handler must be on
            root = base_root(args.cache, timings)
        except StepFailed as exc:
            print(f"image test FAILED at debootstrap: {exc}", file=sys.stderr)
            return 1
        print(f"image test: root ready in {root} (debootstrap {timings['debootstrap']})", flush=True)
        return 0
    run_dir = tempfile.mkdtemp(prefix="run-", dir=args.cache)
    try:
        child = [sys.executable, "-m", "tests.image.imagetest", "--cache", args.cache, "--run-dir", run_dir] + \
            (["--wheel", args.wheel] if args.wheel else [])
        # Every mount of the run is made in this namespace and goes with it, however the run ends.
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "--"] + child, cwd=CHECKOUT,
                              check=False).returncode
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
