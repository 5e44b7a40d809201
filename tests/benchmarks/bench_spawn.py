"""Worker start: how long a new inference worker takes to serve, forked by the zygote and by exec, against
loading the same model in this process, same run.

One JSON line. A worker is started whenever the agent starts, a worker crashed or hung, or the governor or a
command switches the variant (a hot swap), so this is how long a board waits for its model after each.

* ``zygote_ms`` – median time of ``ProcessEngine.start()`` (fork, load, warm up, READY, shared memory
  attached) with the zygote this process started first, as ``fieldnode run`` does
  (:mod:`device.runtime.zygote`).
* ``exec_ms`` – the same after the zygote is stopped: the worker is ``python -m device.runtime.worker``,
  which imports Python's start-up, numpy and the interpreter before it loads the model.
* ``floor_ms`` – the bare interpreter's load, ``allocate_tensors`` and the same warm-up runs in this process:
  what any start cannot go below.
* ``ratio_zygote`` / ``ratio_exec`` – each over the floor; ``speedup`` – exec over zygote.

The zygote runs first and then exec (a zygote cannot be forked again once this process runs threads); each
start is followed by a close, so only one worker lives at a time. Run with ``make bench`` or
``python tests/benchmarks/bench_spawn.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `fieldnode run` does, so the zygote can be forked

from device.runtime import zygote  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="starts of each kind; medians are reported (default 10)")
    p.add_argument("--backend", default="auto", choices=("auto", "litert", "tflite"))
    args = p.parse_args()
    if zygote.start(args.backend) is None:
        print(json.dumps({"bench": "spawn", "error": "no zygote: this process runs threads"}))
        return 1

    import numpy as np

    from device.runtime.backends import load_backend
    from device.runtime.delegates import plan
    from device.runtime.manifest import bundled_model_dir, load_manifest
    from device.runtime.supervisor import ProcessEngine
    from device.runtime.worker import WorkerSpec

    backend = load_backend(args.backend)
    manifest = load_manifest(bundled_model_dir())
    variant = manifest.default_variant
    cands, _ = plan(manifest, variant, "cpu")
    spec = WorkerSpec(backend.name, tuple(cands), threads=2, warmup_runs=2)

    def start_ms() -> float:
        eng = ProcessEngine(spec)
        t0 = time.perf_counter()
        eng.start()
        took = (time.perf_counter() - t0) * 1000
        eng.close()
        return took

    def floor_ms() -> float:
        t0 = time.perf_counter()
        it = backend.Interpreter(model_path=cands[0].path, num_threads=2)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        for _ in range(spec.warmup_runs):
            it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
            it.invoke()
        return (time.perf_counter() - t0) * 1000

    start_ms()  # the page cache and the zygote's first fork; not counted
    forked = [start_ms() for _ in range(args.runs)]
    zygote.stop()
    execd = [start_ms() for _ in range(args.runs)]
    floor = [floor_ms() for _ in range(args.runs)]
    z, e, f = (statistics.median(x) for x in (forked, execd, floor))
    print(json.dumps({
        "bench": "spawn", "backend": backend.name, "variant": variant, "runs": args.runs,
        "zygote_ms": round(z, 1), "exec_ms": round(e, 1), "floor_ms": round(f, 1),
        "ratio_zygote": round(z / f, 2), "ratio_exec": round(e / f, 2), "speedup": round(e / z, 2),
        "zygote_ms_range": [round(min(forked), 1), round(max(forked), 1)],
        "exec_ms_range": [round(min(execd), 1), round(max(execd), 1)],
        "figures": ["zygote_ms", "exec_ms", "floor_ms", "speedup"], "met": None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
