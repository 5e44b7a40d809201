"""An idle agent: wake-ups and CPU per thread against what the same job costs with the bare libraries.

The real agent (``fieldnode run``: the agent, its zygote and its inference worker) runs on the virtual board with
the bundled model, one inference a second (every level's ``interval_ms`` is 1000), connected to a real
mosquitto on loopback. The floor runs in the same run, in a process of its own: a paho client on ``loop_start``,
connected to the same broker and idle, plus a bare pyserial read loop of the same simulated MCU's frame stream
(:class:`drivers.sim.mcu.SimulatedMcu` on a pty, paced by its own thread, which is not counted).

Over ``--seconds`` (default 60) after a warm-up, for every thread of the agent's three processes and of the floor:
``wakeups_per_s`` (voluntary plus involuntary context switches a second, from ``/proc/PID/task/TID/status``;
``voluntary_per_s`` the voluntary ones: sleeps, including waits for the GIL)
and ``cpu_pct`` (time on a CPU, from ``schedstat``, in % of one core). The simulated hardware's threads of the
agent (``sim-mcu``, ``sim-board``) are listed but not counted: a real board has a UART and sysfs instead.

One JSON line:

* ``threads``: ``{"<process>/<thread>": {"wakeups_per_s": ..., "cpu_pct": ...}}``;
* ``cpu_pct``: the agent's own threads (its three processes, without the simulated hardware);
* ``floor_cpu_pct``: the floor's threads (paho's loop, the serial read; not the floor's MCU);
* ``ratio``: ``cpu_pct / floor_cpu_pct``;
* ``link_wakeups_per_s``, ``sent_per_s`` (what the board published, seen by a subscriber) and
  ``link_extra_wakeups_per_s`` (the difference);
* ``met``: the link thread wakes at most 2 times a second beyond the messages it sends, and ``ratio`` <= 1.5
  (``target_link_extra_wakeups_per_s``, ``target_ratio``).
* ``wakeups_per_s``: the sum over the agent's own threads.

Exits 1 when the measurement could not run (no mosquitto, the agent did not connect or died).

Run: ``python tests/benchmarks/bench_idle.py [--seconds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import paho.mqtt.client as mqtt  # noqa: E402

DEV = "idle-bench"
PREFIX = f"fieldnode/v1/{DEV}"
WARMUP_S = 8.0
LINK_EXTRA_MAX = 2.0  # wake-ups a second beyond the messages sent
RATIO_MAX = 1.5
SIMULATION = ("sim-mcu", "sim-board")  # the simulated hardware's threads: not the agent's own


# -- /proc ----------------------------------------------------------------------------------------------------


def sample(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """``{tid: (comm, context switches, of which voluntary, ns on a CPU)}`` for every thread of ``pid`` (empty once
    it is gone)."""
    out = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{base}/{tid}/comm", encoding="utf-8", errors="replace") as f:
                comm = f.read().strip()
            switches = voluntary = 0
            with open(f"{base}/{tid}/status", encoding="ascii") as f:
                for line in f:
                    if "ctxt_switches" in line:  # voluntary and nonvoluntary
                        switches += int(line.split()[-1])
                        if line.startswith("voluntary"):
                            voluntary = int(line.split()[-1])
            with open(f"{base}/{tid}/schedstat", encoding="ascii") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        out[int(tid)] = (comm, switches, voluntary, ns)
    return out


def delta(before: dict, after: dict, seconds: float, process: str) -> dict[str, dict]:
    """Per thread of one process: wake-ups a second and % of a core over the interval (threads that started
    meanwhile count from zero; threads that ended are gone)."""
    rows: dict[str, dict] = {}
    for tid, (comm, sw, vol, ns) in after.items():
        _, sw0, vol0, ns0 = before.get(tid, (comm, 0, 0, 0))
        key = f"{process}/{comm}"
        if key in rows:  # two threads of one name: keep both apart
            key = f"{key}#{tid}"
        rows[key] = {"wakeups_per_s": round((sw - sw0) / seconds, 2), "voluntary_per_s": round((vol - vol0) / seconds, 2),
                     "cpu_pct": round((ns - ns0) / seconds / 1e7, 4)}
    return rows


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return str(pid)


# -- the floor ------------------------------------------------------------------------------------------------


def floor_main(host: str, port: int) -> int:
    """The floor's process: an idle paho client on ``loop_start`` and a bare pyserial read of the simulated
    MCU's stream; prints ``ready`` and runs until SIGTERM."""
    import serial

    from drivers.sim.mcu import SimulatedMcu
    from drivers.sim.signal import VibrationSource

    def rename(t: threading.Thread, name: str) -> None:
        with open(f"/proc/self/task/{t.native_id}/comm", "w", encoding="ascii") as f:
            f.write(name)

    connected = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="idle-floor", protocol=mqtt.MQTTv5)
    c.on_connect = lambda *a: connected.set()
    c.connect(host, port, keepalive=30)
    c.loop_start()
    if not connected.wait(15):
        print("floor: no CONNACK", flush=True)
        return 1
    for t in threading.enumerate():
        if t.name.startswith("paho"):
            rename(t, "floor-paho")
    mcu = SimulatedMcu(VibrationSource(seed=7))
    mcu.start()
    rename(next(t for t in threading.enumerate() if t.name == "sim-mcu"), "sim-mcu")
    got = [0]

    def read() -> None:
        with serial.serial_for_url(mcu.port, baudrate=115200, timeout=None) as s:
            while True:
                got[0] += len(s.read(s.in_waiting or 1))

    reader = threading.Thread(target=read, name="floor-serial", daemon=True)
    reader.start()
    rename(reader, "floor-serial")
    from device.threads import name_native_threads

    name_native_threads("floor-native")  # numpy's own threads, if any (idle)
    rename(threading.main_thread(), "floor-main")
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    c.disconnect()
    c.loop_stop()
    mcu.close()
    return 0


# -- the run --------------------------------------------------------------------------------------------------


def write_config(tmp: str, broker) -> str:
    lines = ["[device]", f'id = "{DEV}"', f'state_dir = "{tmp}/state"', f'runtime_dir = "{tmp}/run"',
             "[drivers]", 'virtual_board = "rpi4"', "[power]"]
    for level in ("performance", "balanced", "saver", "critical"):
        lines += [f"{level}.interval_ms = 1000"]
    lines += ["[link]", f'broker = "{broker.url}"', "keepalive_s = 30"]
    path = os.path.join(tmp, "fieldnode.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Observer:
    """Counts what the board publishes (results, events, telemetry, its state)."""

    def __init__(self, broker) -> None:
        self.count = 0
        self.online = threading.Event()
        self.results = 0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="idle-observer", protocol=mqtt.MQTTv5)
        self.c.on_message = self._message
        self.c.connect(broker.host, broker.port)
        self.c.subscribe(f"{PREFIX}/#", qos=1)
        self.c.loop_start()

    def _message(self, c, u, m) -> None:
        if m.retain:
            return
        self.count += 1
        if "/results/" in m.topic:
            self.results += 1
            self.online.set()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def measure(seconds: float) -> dict:
    from tests.link.broker import Broker

    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        broker = Broker(os.path.join(tmp, "broker")).start()
        agent = floor = observer = None
        try:
            cfg = write_config(tmp, broker)
            env = {**os.environ, "PYTHONPATH": ROOT}
            env.pop("NOTIFY_SOCKET", None)
            env.pop("WATCHDOG_USEC", None)
            log = open(os.path.join(tmp, "agent.log"), "wb")
            agent = subprocess.Popen([sys.executable, "-m", "tools.cli", "run", "--config", cfg, "--log-format",
                                      "text"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            floor = subprocess.Popen([sys.executable, __file__, "--floor", broker.host, str(broker.port)], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, text=True)
            observer = Observer(broker)
            if floor.stdout.readline().strip() != "ready":
                raise RuntimeError("the floor process did not start")
            if not observer.online.wait(120):
                raise RuntimeError("the agent published no result; its log:\n" + _tail(tmp))
            time.sleep(WARMUP_S)
            procs = {"agent": agent.pid}
            for pid in children(agent.pid):
                procs[process_name(pid)] = pid
                for grand in children(pid):
                    procs[process_name(grand)] = grand
            procs["floor"] = floor.pid
            before = {name: sample(pid) for name, pid in procs.items()}
            sent0, t0 = observer.count, time.monotonic()
            time.sleep(seconds)
            after = {name: sample(pid) for name, pid in procs.items()}
            sent1, t1 = observer.count, time.monotonic()
            if agent.poll() is not None:
                raise RuntimeError("the agent ended during the measurement; its log:\n" + _tail(tmp))
        finally:
            for p in (agent, floor):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
            if observer is not None:
                observer.close()
            broker.stop()
    span = t1 - t0
    threads: dict[str, dict] = {}
    for name in procs:
        threads.update(delta(before[name], after[name], span, name))
    own = {k: v for k, v in threads.items() if not k.startswith("floor/") and k.split("/")[1] not in SIMULATION}
    floor_rows = {k: v for k, v in threads.items() if k.startswith("floor/") and k != "floor/sim-mcu"}
    cpu = sum(v["cpu_pct"] for v in own.values())
    floor_cpu = sum(v["cpu_pct"] for v in floor_rows.values())
    link = threads.get("agent/link", {}).get("wakeups_per_s")
    sent = (sent1 - sent0) / span
    extra = None if link is None else round(link - sent, 2)
    ratio = round(cpu / floor_cpu, 2) if floor_cpu > 0 else None
    met = extra is not None and ratio is not None and extra <= LINK_EXTRA_MAX and ratio <= RATIO_MAX
    return {"bench": "idle", "seconds": round(span, 1), "threads": threads,
            "wakeups_per_s": round(sum(v["wakeups_per_s"] for v in own.values()), 2),
            "cpu_pct": round(cpu, 3), "floor_cpu_pct": round(floor_cpu, 3), "ratio": ratio,
            "link_wakeups_per_s": link, "sent_per_s": round(sent, 2), "link_extra_wakeups_per_s": extra,
            "target_link_extra_wakeups_per_s": f"<= {LINK_EXTRA_MAX:g}", "target_ratio": f"<= {RATIO_MAX:g}",
            "figures": ["wakeups_per_s", "cpu_pct", "floor_cpu_pct", "link_wakeups_per_s", "sent_per_s"],
            "met": met}


def _tail(tmp: str) -> str:
    try:
        with open(os.path.join(tmp, "agent.log"), encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-40:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="measurement length (default 60)")
    p.add_argument("--floor", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.floor:
        return floor_main(args.floor[0], int(args.floor[1]))
    try:
        out = measure(args.seconds)
    except Exception as exc:  # the measurement could not run: say why, exit non-zero
        print(json.dumps({"bench": "idle", "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
