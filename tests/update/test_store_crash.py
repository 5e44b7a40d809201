"""Crash consistency of the A/B store: an installer in a real process (tests/update/storeproc.py) is SIGKILLed
at every step boundary and at 200+ random points, and each time a fresh store's recover() finds exactly the
old model or the new one active, byte for byte, with nothing left in staging.

SIGKILL tests process death: writes in flight are cut, but what the process handed to the kernel stays.
Power loss (where the page cache goes too) is covered by the order of the fsyncs (every file and directory of
a slot before the rename that names it, write-fsync-rename-fsync for each state file), not by these tests.

The store starts with v0 committed, then v1 committed (so the install of v2 replaces the fallback slot and
goes through every step the store has); old = v1, new = v2.
"""

from __future__ import annotations

import collections
import os
import queue
import random
import shutil
import signal
import threading
import time

import pytest

from device.update.store.store import ModelStore, Recovery
from tests.update import storeproc
from tests.update.test_store import install, make_model, tree

FILES = ("model.json", "vibration_full.tflite", "vibration_lite.tflite", "vibration_testvectors.npz")
INSTALL = (["begin.staged", "proc.begun"] + [f"proc.wrote:{f}" for f in FILES]
           + ["activate.synced", "activate.unpinned", "activate.trashed", "activate.placed", "activate.switched",
              "activate.done", "proc.activated"])
STEPS = {"commit": INSTALL + ["commit.floor", "commit.switched", "proc.committed"],
         "rollback": INSTALL + ["rollback.marked", "rollback.switched", "proc.rolled_back"]}
RANDOM_KILLS = 200


class Run:
    def __init__(self):
        self.steps: list = []
        self.times: list = []  # when each step was seen (perf_counter)
        self.code: int | None = None
        self.error: str | None = None
        self.t0 = 0.0


class Server:
    """The fork server of storeproc.py, one job at a time."""

    def __init__(self):
        self.proc = storeproc.spawn("serve")
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n").split(maxsplit=2))
        self.lines.put(None)

    def job(self, root, src, version, finish, stop="-", kill_after=None) -> Run:
        """Runs one install; ``stop`` kills it at that step, ``kill_after=(step, seconds)`` that long after
        the step was announced (``pid`` for the fork)."""
        run = Run()
        self.proc.stdin.write(f"install {root} {src} {version} {finish} {stop}\n")
        t0 = None
        while True:
            words = self.lines.get(timeout=60)
            assert words is not None, "the fork server died"
            kind = words[0]
            if kind == "pid":
                t0 = time.perf_counter()
            if kind == "step":
                run.steps.append(words[2])
                run.times.append(time.perf_counter())
            if kill_after is not None and (words[-1] if kind == "step" else kind) == kill_after[0]:
                time.sleep(kill_after[1])
                kill(int(words[1]))
            if kind == "at":
                kill(int(words[1]))
            elif kind == "error":
                run.error = words[2]
            elif kind == "done":
                run.code, run.t0 = int(words[2]), t0
                run.times.append(time.perf_counter())
                return run

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it finished first
        pass


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("crash")
    models = {v: make_model(base / f"m{v}", f"{v}.0.0") for v in (0, 1, 2, 3)}
    template = str(base / "template")
    store = ModelStore(template, reserve_bytes=0)
    install(store, models[0], 0)
    install(store, models[1], 1)
    assert (store.active().slot, store.fallback().slot) == ("b", "a")
    os.unlink(os.path.join(template, "lock"))  # each copy gets its own lock file, not a link to one
    trees = {v: tree(models[v]) for v in models}
    return {"base": base, "models": models, "template": template, "trees": trees, "n": [0]}


def fresh(world) -> str:
    world["n"][0] += 1
    root = str(world["base"] / f"s{world['n'][0]}")
    # Hard links: the store never writes a slot file in place (it writes new files and renames), and if it
    # did, the template would change and the next runs' byte checks against the model directories would fail.
    shutil.copytree(world["template"], root, copy_function=os.link)
    return root


def check(world, root: str, run: Run, finish: str):
    """Recovers the store as a restarted agent would and checks it holds exactly the old or the new model."""
    assert run.error is None, run.error
    store = ModelStore(root)
    outcome = store.recover()
    active, fallback = store.active(), store.fallback()
    assert active is not None
    assert active.version in (1, 2), active
    assert tree(active.dir) == world["trees"][active.version]  # byte-identical, every file
    if fallback is not None:
        assert tree(fallback.dir) == world["trees"][fallback.version]
        assert (active.version, fallback.version) in ((1, 0), (2, 1))
    assert os.listdir(store.staging_dir) == []
    assert sorted(os.listdir(store.slots_dir)) == sorted({active.slot} | ({fallback.slot} if fallback else set()))
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    done = set(run.steps)
    floor = store.floor("vibration")
    if finish == "commit":
        assert store.failed_versions("vibration") == {}
        if "activate.switched" in done:
            assert active.version == 2  # an announced switch is never undone
        if active.version == 2:
            assert outcome in (Recovery.TRIAL_RESUMED, Recovery.COMMITTED)
            assert active.state == ("committed" if outcome == Recovery.COMMITTED else "trial")
        if "commit.switched" in done:
            assert active.state == "committed"
        if (active.version, active.state) == (2, "committed") or "commit.floor" in done:
            assert floor == 2
        if active.version == 1:
            assert floor == 1
    else:
        if "rollback.marked" in done:
            assert active.version == 1 and 2 in store.failed_versions("vibration")
        elif "activate.switched" in done:
            assert active.version == 2 and active.state == "trial"
        assert floor == 1
    if active.version == 1:
        assert active.state == "committed"
    again = ModelStore(root)  # recovery is idempotent
    assert again.recover(restarted=False) in (Recovery.COMMITTED, Recovery.TRIAL_RESUMED)
    assert again.active() == active and again.fallback() == fallback
    return store, active


def test_a_whole_install_announces_every_step(server, world):
    for finish in ("commit", "rollback"):
        root = fresh(world)
        run = server.job(root, world["models"][2], 2, finish)
        assert run.code == 0 and run.error is None
        assert run.steps == STEPS[finish]
        store, active = check(world, root, run, finish)
        assert active.version == (2 if finish == "commit" else 1)


@pytest.mark.parametrize("finish, step", [(f, s) for f in STEPS for s in STEPS[f]
                                          if f == "commit" or s not in INSTALL])
def test_killed_at_a_step_boundary_the_store_holds_the_old_or_the_new_model(server, world, finish, step):
    root = fresh(world)
    run = server.job(root, world["models"][2], 2, finish, stop=step)
    assert run.code == -signal.SIGKILL and run.steps[-1] == step
    store, active = check(world, root, run, finish)
    at = STEPS[finish].index
    if finish == "commit":  # the new model from the switch on, whatever the commit got to
        assert active.version == (2 if at(step) >= at("activate.switched") else 1)
    else:  # the new model between the switch and the failed mark; the old one again after it
        assert active.version == (2 if at("activate.switched") <= at(step) < at("rollback.marked") else 1)
    if active.state == "trial":
        store.commit(2)
    assert install(store, world["models"][3], 3).version == 3  # the recovered store installs again


def test_killed_at_random_points_the_store_holds_the_old_or_the_new_model(server, world):
    # Random points spread over the whole install: after a step picked at random (or the fork), a random
    # fraction of the time the next step took in whole runs. A uniform delay from the start would land most
    # kills in the long fsync phases and few after the switch.
    anchors = ["pid"] + STEPS["commit"][:-1]
    gaps = collections.defaultdict(list)
    for _ in range(5):
        run = server.job(fresh(world), world["models"][2], 2, "commit")
        assert run.code == 0 and run.steps == STEPS["commit"]
        times = [run.t0] + run.times
        for anchor, t, nxt in zip(anchors, times, times[1:]):
            gaps[anchor].append(nxt - t)
    rng = random.Random(10)
    kills, last_steps, versions, attempts = 0, collections.Counter(), collections.Counter(), 0
    while kills < RANDOM_KILLS:
        attempts += 1
        assert attempts < RANDOM_KILLS * 4, f"only {kills} of {attempts} runs were killed before they ended"
        root = fresh(world)
        anchor = rng.choice(anchors)
        run = server.job(root, world["models"][2], 2, "commit",
                         kill_after=(anchor, rng.uniform(0, 1.2 * max(gaps[anchor]))))
        _store, active = check(world, root, run, "commit")
        shutil.rmtree(root)
        if run.code == -signal.SIGKILL:
            kills += 1
            last_steps[run.steps[-1] if run.steps else "(none)"] += 1
            versions[active.version] += 1
        else:
            assert run.code == 0
    # The kills landed all over the install, and both outcomes happened.
    assert len(last_steps) >= len(anchors) // 2, last_steps
    assert versions[1] >= 20 and versions[2] >= 20, versions
