"""Footprint: the steady memory of ``fieldnode run --sim`` with its link on and its time to ``READY=1``, against
a floor, same run.

Two JSON lines (issue "On the board for real"), one per ``runtime.isolation``: ``process`` (the default: the
interpreter in a worker forked by a zygote) and ``inline`` (the interpreter in the agent). Both run with the link
on, as every real board does: a real mosquitto on loopback (``tests/link/broker.py``; missing mosquitto is an
``error`` line and exit status 1), the agent publishing its results and telemetry to it.

* ``pss_mb`` – the summed PSS (``/proc/<pid>/smaps_rollup``) of the agent and of every process under it (the
  worker zygote, the inference worker, and anything else it starts), ``--settle`` seconds after ``READY=1``, on a
  virtual board with the bundled vibration model. PSS splits a shared page between the processes that map it,
  so the sum counts the agent's and the worker's common libraries once. ``parts_pss_mb`` names each process
  by what it is (``agent``, ``zygote``, ``worker``, ``resource_tracker``, else its command line).
* ``floor_pss_mb`` – one process doing the same job as directly as it can be done: it imports what the agent
  needs for it (numpy, the interpreter backend the agent used, pyserial, paho-mqtt, cryptography's Ed25519 for
  signed commands, sqlite3), loads the same model variant with the same thread count, runs it, keeps each result
  in an SQLite table and publishes it at QoS 1 to the same broker: what a single process doing this job cannot
  go below.
* ``alone_mb`` / ``floor_alone_mb`` – the distinct physical pages the same processes map (from
  ``/proc/<pid>/pagemap``): their PSS as it would be if nothing else on the machine mapped the same files,
  as on a board where the agent is the only Python. PSS also splits a page with *other* processes (another
  agent, a test run, anything from the same venv), so on a shared build machine it moves with their load;
  this figure does not. It needs CAP_SYS_ADMIN to read frame numbers; without it, it is null.
* ``ratio`` – the median over ``--repeats`` runs of ``alone_mb / floor_alone_mb``; target <= 1.5 for the
  isolated agent, <= 1.25 for the inline one. Null (n/a) when frame numbers are hidden; ``ratio_pss``, the PSS
  ratio, is reported either way.
* ``ready_s`` – the median time from exec of ``fieldnode run --sim`` to its ``READY=1`` datagram on
  ``$NOTIFY_SOCKET`` (a socket this benchmark listens on), target <= 1.5 s on the 2-core build machine.
  ``floor_ready_s`` is the floor process's time from exec to its 20th result published and acknowledged.

The agents and the floor never run at the same time (a page they both map would be split between them and
shrink both PSS figures), and they alternate, so drift in the machine's load hits all alike. The benchmark
exits 1 (after printing what it measured) when a run is wrong: an agent that does not reach ``READY=1``, whose
results never reach the broker, that does not exit 0 on SIGTERM or leaves a process behind.

Run with ``make bench`` or
``python tests/benchmarks/bench_footprint.py [--repeats N] [--settle S] [--isolation process|inline|both]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from tests.link.broker import Broker, BrokerError  # noqa: E402
MODEL_DIR = os.path.join(ROOT, "device", "models", "vibration")

# The console script's own code, so the measured process is what `fieldnode` runs and works from a checkout.
AGENT = "import sys; from tools.cli import main; sys.exit(main(sys.argv[1:]))"

TARGET_RATIO = {"process": 1.5, "inline": 1.25}

FLOOR = r"""
import json, os, sqlite3, sys, threading, time
t_exec = float(sys.argv[3])
import numpy as np
import serial  # noqa: F401 (the sensor's)
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: F401 (verifying signed commands)

host, port, db_path = sys.argv[5], int(sys.argv[6]), sys.argv[7]
acked = threading.Semaphore(0)
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-floor", protocol=mqtt.MQTTv5)
client.on_publish = lambda c, u, mid, rc, props: acked.release()
client.connect(host, port)
client.loop_start()
db = sqlite3.connect(db_path)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE results (id INTEGER PRIMARY KEY, payload BLOB)")

backend = sys.argv[2]
if backend == "litert":
    from ai_edge_litert.interpreter import Interpreter
else:
    from tflite_runtime.interpreter import Interpreter
it = Interpreter(model_path=sys.argv[1], num_threads=int(sys.argv[4]))
it.allocate_tensors()
rng = np.random.default_rng(0)
for _ in range(20):
    for d in it.get_input_details():
        if np.issubdtype(d["dtype"], np.integer):
            info = np.iinfo(d["dtype"])
            x = rng.integers(info.min, info.max, size=d["shape"], endpoint=True).astype(d["dtype"])
        else:
            x = rng.standard_normal(d["shape"]).astype(d["dtype"])
        it.set_tensor(d["index"], x)
    it.invoke()
    out = [it.get_tensor(d["index"]) for d in it.get_output_details()]
    payload = json.dumps({"scores": [o.ravel().tolist() for o in out]}).encode()
    db.execute("INSERT INTO results (payload) VALUES (?)", (payload,))
    db.commit()
    client.publish("fieldnode/v1/bench-floor/results/vibration", payload, qos=1)
for _ in range(20):
    if not acked.acquire(timeout=30):
        raise SystemExit("floor: the broker did not acknowledge its results")
ready = time.time() - t_exec
print(json.dumps({"ready_s": ready}), flush=True)
sys.stdin.readline()  # measured now; the benchmark closes stdin to end it
"""


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """``root`` and every living process under it (walks each process's parent in ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(_ppid(int(entry)), []).append(int(entry))
            except (OSError, ValueError, IndexError):  # it ended while we looked
                pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def pss_kb(pid: int) -> dict:
    """``Pss``, ``Rss`` and the private (USS) kB of one process from its ``smaps_rollup``."""
    got = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss", "Private_Clean", "Private_Dirty"):
                got[key] = int(rest.split()[0])
    return {"pss": got["Pss"], "rss": got["Rss"], "uss": got["Private_Clean"] + got["Private_Dirty"]}


PAGE = os.sysconf("SC_PAGE_SIZE")
_PFN = (1 << 55) - 1
_PRESENT = 1 << 63


def frames(pid: int) -> set[int] | None:
    """The physical page frames ``pid`` maps now (present pages only), or None when ``pagemap`` hides them
    (reading frame numbers needs CAP_SYS_ADMIN; without it the kernel reports 0)."""
    ranges, rss_kb, cur = [], 0, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = head.split("-")
                cur = (int(lo, 16), int(hi, 16))
            elif head == "Rss:" and cur is not None:
                rss_kb = int(line.split()[1])
                if rss_kb:  # only ranges with resident pages: the rest of the address space is reservations
                    ranges.append(cur)
    out: set[int] = set()
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        for lo, hi in ranges:
            f.seek(lo // PAGE * 8)
            raw = f.read((hi - lo) // PAGE * 8)
            for (entry,) in struct.iter_unpack("<Q", raw):
                if entry & _PRESENT:
                    out.add(entry & _PFN)
    if out and not any(out):
        return None
    out.discard(0)
    return out if out else None


def label(pid: int, root: int) -> str:
    if pid == root:
        return "agent"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    line = " ".join(argv)
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = ""
    if comm == "fieldnode-fork":
        return "zygote"
    if comm == "fieldnode-infer" or "device.runtime.worker" in line:
        return "worker"
    if "resource_tracker" in line:
        return "resource_tracker"
    return line[:60]


def measure_tree(root: int) -> dict:
    """The PSS of ``root`` and everything under it, by process, and the frames they map between them."""
    parts: dict[str, float] = {}
    counts: dict[str, int] = {}
    total = {"pss": 0, "rss": 0, "uss": 0}
    union: set[int] | None = set()
    for pid in descendants(root):
        try:
            m = pss_kb(pid)
            got = frames(pid)
        except OSError:
            continue
        name = label(pid, root)
        parts[name] = parts.get(name, 0) + m["pss"] / 1024
        counts[name] = counts.get(name, 0) + 1
        for k in total:
            total[k] += m[k]
        union = None if union is None or got is None else union | got
    return {"pss_mb": total["pss"] / 1024, "rss_mb": total["rss"] / 1024, "uss_mb": total["uss"] / 1024,
            "alone_mb": None if union is None else len(union) * PAGE / 2**20, "parts_mb": parts,
            "processes": counts}


class NotifyListener:
    """A datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.said: list[str] = []

    def wait_for(self, line: str, timeout: float, proc: subprocess.Popen | None = None) -> float | None:
        """Returns the monotonic time at which a datagram carrying ``line`` arrived, or None on timeout or when
        ``proc`` has exited."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or (proc is not None and proc.poll() is not None):
                return None
            self.sock.settimeout(min(left, 0.1))
            try:
                data = self.sock.recv(65536).decode("utf-8", "replace")
            except socket.timeout:
                continue
            now = time.monotonic()
            self.said.extend(data.split("\n"))
            if line in data.split("\n"):
                return now

    def close(self) -> None:
        self.sock.close()


def run_agent(tmp: str, backend: str, settle_s: float, timeout_s: float, isolation: str, broker: Broker) -> dict:
    """One agent run with its link to ``broker``: measured ``settle_s`` after ``READY=1``, then stopped.

    Raises:
        RuntimeError: No ``READY=1``, the agent exited early, or none of its messages reached the broker.
    """
    state, rundir, trust = (os.path.join(tmp, n) for n in ("state", "run", "trust"))
    os.makedirs(trust)
    cfg = os.path.join(tmp, "fieldnode.toml")
    with open(cfg, "w") as f:
        f.write(f'[device]\nid = "bench-agent"\nstate_dir = "{state}"\nruntime_dir = "{rundir}"\n\n'
                f'[runtime]\nbackend = "{backend}"\nisolation = "{isolation}"\n\n'
                f'[link]\nbroker = "{broker.url}"\ntrust_dir = "{trust}"\n')
    heard = Heard(broker, "fieldnode/v1/bench-agent/#")
    listener = NotifyListener(os.path.join(tmp, "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=listener.path, PYTHONPATH=ROOT)
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    log = open(os.path.join(tmp, "agent.log"), "wb")
    t_exec = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", AGENT, "--config", cfg, "run", "--sim"], env=env, cwd=tmp,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = listener.wait_for("READY=1", timeout_s, proc)
        if ready is None:
            why = f"it exited with {proc.returncode}" if proc.poll() is not None else f"not within {timeout_s:g} s"
            raise RuntimeError(f"no READY=1 ({why}; it said {listener.said}); its log ends: {_tail(log.name)}")
        time.sleep(settle_s)
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode} while settling; its log ends: "
                               f"{_tail(log.name)}")
        out = measure_tree(proc.pid)
        out["ready_s"] = ready - t_exec
        out["messages"] = heard.count
        if not heard.count:
            raise RuntimeError(f"no message from the agent reached the broker in {settle_s:g} s after READY=1; "
                               f"its log ends: {_tail(log.name)}")
        out["status"] = next((s[len("STATUS="):] for s in reversed(listener.said) if s.startswith("STATUS=")), "")
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out["exit"] = proc.wait(30)
        time.sleep(0.2)
        out["left_running"] = sum(1 for p in tree[1:] if os.path.exists(f"/proc/{p}") and _alive(p))
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        listener.close()
        heard.close()


class Heard:
    """A subscriber on ``broker`` counting the messages published under ``topic`` (the agent's own tree)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.count = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-heard-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic, qos=0)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, message: object) -> None:
        self.count += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _tail(path: str, lines: int = 8) -> str:
    with open(path, "rb") as f:
        return " | ".join(f.read().decode(errors="replace").splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_floor(model: str, backend: str, threads: int, broker: Broker, tmp: str) -> dict:
    """One floor run (see the module docstring), measured a second after its 20th result was acknowledged."""
    t_exec = time.time()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR, model, backend, repr(t_exec), str(threads), broker.host,
                             str(broker.port), os.path.join(tmp, "floor.db")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the floor process failed (exit {proc.wait()})")
        ready = json.loads(line)["ready_s"]
        time.sleep(1.0)  # as the agent: measured when nothing is being loaded any more
        m = pss_kb(proc.pid)
        got = frames(proc.pid)
        return {"pss_mb": m["pss"] / 1024, "rss_mb": m["rss"] / 1024, "uss_mb": m["uss"] / 1024,
                "alone_mb": None if got is None else len(got) * PAGE / 2**20, "ready_s": ready}
    finally:
        proc.stdin.close()
        proc.wait(10)


def agent_backend(requested: str) -> str:
    """The backend ``auto`` resolves to here (the floor must load the same one)."""
    if requested != "auto":
        return requested
    sys.path.insert(0, ROOT)
    from device.runtime.backends import load_backend

    return load_backend("auto").name


def summarise(isolation: str, backend: str, variant: str, threads: int, args: argparse.Namespace, runs: list,
              floors: list) -> dict:
    """The JSON line of one isolation's runs against the floors they alternated with."""
    ratios = [r["pss_mb"] / f["pss_mb"] for r, f in zip(runs, floors)]
    alone = [r["alone_mb"] / f["alone_mb"] for r, f in zip(runs, floors)
             if r["alone_mb"] is not None and f["alone_mb"] is not None] or None
    gated = alone or ratios  # the run shown in detail: the median one by the figure a board sees, when readable
    mid = sorted(range(len(gated)), key=gated.__getitem__)[len(gated) // 2]
    run, floor = runs[mid], floors[mid]
    ratio = None if alone is None else statistics.median(alone)
    ready = statistics.median(r["ready_s"] for r in runs)
    ok_exit = all(r["exit"] == 0 and r["left_running"] == 0 for r in runs)
    target = TARGET_RATIO[isolation]

    def mb(x: float | None) -> float | None:
        return None if x is None else round(x, 1)

    return {
        "bench": "footprint", "isolation": isolation, "backend": backend, "variant": variant,
        "threads": threads, "link": "on", "board": "simulated rpi4", "settle_s": args.settle, "repeats": args.repeats,
        "ratio": None if ratio is None else round(ratio, 3),
        "alone_mb": mb(run["alone_mb"]), "floor_alone_mb": mb(floor["alone_mb"]),
        "ratio_alone_trials": alone and sorted(round(r, 3) for r in alone),
        "ratio_pss": round(statistics.median(ratios), 3), "ratio_pss_trials": sorted(round(r, 3) for r in ratios),
        "pss_mb": mb(run["pss_mb"]), "floor_pss_mb": mb(floor["pss_mb"]),
        "parts_pss_mb": {k: round(v, 1) for k, v in sorted(run["parts_mb"].items(), key=lambda kv: -kv[1])},
        "processes": run["processes"],
        "rss_mb": mb(run["rss_mb"]), "uss_mb": mb(run["uss_mb"]),
        "floor_rss_mb": mb(floor["rss_mb"]), "floor_uss_mb": mb(floor["uss_mb"]),
        "ready_s": round(ready, 3), "ready_s_trials": sorted(round(r["ready_s"], 3) for r in runs),
        "floor_ready_s": round(statistics.median(f["ready_s"] for f in floors), 3),
        "messages_heard": [r["messages"] for r in runs],
        "status": run["status"], "sigterm_exit_0": ok_exit,
        "figures": ["ratio_pss"],
        "target_ratio": f"<= {target:g}", "target_ready_s": "<= 1.5",
        "met": None if ratio is None else ratio <= target and ready <= 1.5,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="floor/agent rounds; medians are reported (default 3)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after READY=1 before measuring (default 10)")
    p.add_argument("--backend", default="auto", choices=("auto", "litert", "tflite"))
    p.add_argument("--isolation", default="both", choices=("process", "inline", "both"),
                   help="the agents' runtime.isolation: process (the default), inline (the interpreter in the "
                        "agent), or both, one line each (default, what make bench measures)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for READY=1 (default 60)")
    args = p.parse_args()
    isolations = ("process", "inline") if args.isolation == "both" else (args.isolation,)
    backend = agent_backend(args.backend)
    with open(os.path.join(MODEL_DIR, "model.json")) as f:
        manifest = json.load(f)
    variant = manifest["default_variant"]
    model = os.path.join(MODEL_DIR, manifest["variants"][variant]["file"])
    threads = 2  # runtime.threads' default, which the agent runs with here
    runs: dict = {i: [] for i in isolations}
    floors: list = []
    with tempfile.TemporaryDirectory(prefix="fieldnode-bench-footprint-") as top:
        try:
            broker = Broker(os.path.join(top, "broker"), "plain").start()
        except BrokerError as e:
            for isolation in isolations:
                print(json.dumps({"bench": "footprint", "isolation": isolation, "error": f"no broker: {e}"}))
            return 1
        try:
            for n in range(args.repeats):  # the floor, then each agent: never two at once
                with tempfile.TemporaryDirectory(dir=top) as tmp:
                    floors.append(run_floor(model, backend, threads, broker, tmp))
                for isolation in isolations:
                    with tempfile.TemporaryDirectory(dir=top) as tmp:
                        runs[isolation].append(run_agent(tmp, backend, args.settle, args.timeout, isolation, broker))
        except RuntimeError as e:
            for isolation in isolations:
                print(json.dumps({"bench": "footprint", "isolation": isolation, "error": str(e)[:500]}))
            return 1
        finally:
            broker.stop()
    lines = [summarise(i, backend, variant, threads, args, runs[i], floors) for i in isolations]
    for line in lines:
        print(json.dumps(line))
    return 0 if all(line["sigterm_exit_0"] for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
