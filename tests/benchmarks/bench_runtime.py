"""Runtime overhead benchmark: the agent's isolated runtime against the bare interpreter, same run.

Prints one JSON line. Targets (issue "Foundation"): in process isolation, 2 threads, ai-edge-litert,
``overhead_ratio <= 1.05`` on MobileNetV2 1.0/224 int8 and ``p50 - raw p50 <= 60 us`` on 0.35/96 int8;
outputs bit-identical. Run with ``make bench`` (or directly with the venv's python).
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tools.bench import run_bench  # noqa: E402

MODELS = os.path.join(os.path.dirname(HERE), "models")


def main() -> int:
    big = run_bench(os.path.join(MODELS, "mobilenet_v2_1.0_224_int8.tflite"), runs=300, warmup=30, threads=2,
                    isolation="process", delegate="auto", backend="litert")
    small = run_bench(os.path.join(MODELS, "mobilenet_v2_0.35_96_int8.tflite"), runs=2000, warmup=200,
                      threads=2, isolation="process", delegate="auto", backend="litert")
    keep = ("p50_ms", "p95_ms", "p99_ms", "raw_p50_ms", "raw_p95_ms", "overhead_ratio", "overhead_us", "identical",
            "init_ms", "first_ms", "rss_mb", "agent_rss_mb", "delegate", "runs")
    out = {
        "bench": "runtime",
        "backend": f"{big['backend']} {big['backend_version']}",
        "isolation": "process",
        "threads": 2,
        "mobilenet_v2_1.0_224_int8": {k: big[k] for k in keep},
        "mobilenet_v2_0.35_96_int8": {k: small[k] for k in keep},
        "target_ratio_1.0_224": 1.05,
        "target_overhead_us_0.35_96": 60,
        "met": big["overhead_ratio"] <= 1.05 and small["overhead_us"] <= 60 and big["identical"] and small["identical"],
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
