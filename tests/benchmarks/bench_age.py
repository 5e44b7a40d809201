"""age decryption: the board's streaming reader against the same work done one-shot in memory, same run.

One JSON line:

* ``stream_s`` – ``device.update.age.decrypt`` of a ``--mb`` MB age file (default 200) from a file, hashing the
  plaintext with SHA-256 in ``on_chunk``, chunks written to a sink that drops them.
* ``oneshot_s`` – the same plaintext's raw ChaCha20-Poly1305 ciphertext read whole from a file, decrypted with
  one ``ChaCha20Poly1305.decrypt`` call, and hashed with one SHA-256: the floor for this work in Python.
* ``ratio`` – the median over alternating pairs of ``oneshot_s / stream_s`` (1.0 = as fast as one-shot;
  the update benchmark's target for the whole install is >= 0.8).
* ``extra_rss_mb`` / ``oneshot_extra_rss_mb`` – how much each path's peak RSS grows in a fresh process,
  after imports and a warm-up (target for the streaming reader: <= 32 MB whatever the size).

Each trial runs in its own process so the peak RSS of one does not hide the other's. Run with ``make bench``
or ``python tests/benchmarks/bench_age.py [--mb N] [--pairs N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402

from device.update import age  # noqa: E402

_TRIAL = """
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from device.update import age

mode, path, key_or_identity, small = sys.argv[2:6]

def peak_mb():  # VmHWM starts afresh in a new program; ru_maxrss is carried over from the parent
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

class Sink:
    def write(self, b):
        return len(b)

def stream(p):
    digest = hashlib.sha256()
    with open(p, "rb") as src:
        age.decrypt(src, Sink(), [key_or_identity], on_chunk=digest.update)
    return digest.hexdigest()

def oneshot(p):
    with open(p, "rb") as src:
        blob = src.read()
    return hashlib.sha256(ChaCha20Poly1305(bytes.fromhex(key_or_identity)).decrypt(bytes(12), blob, None)).hexdigest()

run = stream if mode == "stream" else oneshot
run(small)  # warm up: imports, first buffers
before = peak_mb()
t0 = time.perf_counter()
sha = run(path)
dt = time.perf_counter() - t0
print(json.dumps({"s": dt, "sha": sha, "extra_rss_mb": peak_mb() - before}))
"""


class _Generated:
    def __init__(self, size: int):
        self.left, self.rng = size, random.Random(200)

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def _trial(mode: str, path: str, key: str, small: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _TRIAL, ROOT, mode, path, key, small],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=200, help="plaintext size in MB (default 200)")
    p.add_argument("--pairs", type=int, default=3, help="alternating stream/one-shot pairs (default 3)")
    args = p.parse_args()
    size = args.mb * 1000 * 1000
    identity, recipient = age.generate_identity()
    key = ChaCha20Poly1305.generate_key()
    with tempfile.TemporaryDirectory(prefix="fieldnode-bench-age-") as tmp:
        sealed, raw, small = (os.path.join(tmp, n) for n in ("big.age", "big.raw", "small"))
        digest = hashlib.sha256()
        with open(sealed, "wb") as dst:  # written streaming: the benchmark host never holds the file either
            age.encrypt(_Generated(size), dst, [recipient], chunk_hook=digest.update)
        with open(raw, "wb") as dst:
            dst.write(ChaCha20Poly1305(key).encrypt(bytes(12), _Generated(size).read(), None))
        small_age, small_raw = small + ".age", small + ".raw"
        with open(small_age, "wb") as f:
            f.write(age.encrypt_bytes(b"\x00" * 200_000, [recipient]))
        with open(small_raw, "wb") as f:
            f.write(ChaCha20Poly1305(key).encrypt(bytes(12), b"\x00" * 200_000, None))
        streams, oneshots = [], []
        for _ in range(args.pairs):  # alternate, so drift in the machine's load hits both alike
            streams.append(_trial("stream", sealed, identity, small_age))
            oneshots.append(_trial("oneshot", raw, key.hex(), small_raw))
    assert all(t["sha"] == digest.hexdigest() for t in streams + oneshots), "a path produced other plaintext"
    ratios = sorted(o["s"] / s["s"] for s, o in zip(streams, oneshots))
    ratio = statistics.median(ratios)
    extra = max(t["extra_rss_mb"] for t in streams)
    print(json.dumps({
        "bench": "age", "plaintext_mb": args.mb, "chunk_kib": age.CHUNK_SIZE // 1024,
        "stream_s": round(statistics.median(t["s"] for t in streams), 3),
        "oneshot_s": round(statistics.median(t["s"] for t in oneshots), 3),
        "ratio": round(ratio, 3), "ratio_pairs": [round(r, 3) for r in ratios],
        "extra_rss_mb": round(extra, 1),
        "oneshot_extra_rss_mb": round(max(t["extra_rss_mb"] for t in oneshots), 1),
        "target_ratio": 0.8, "target_extra_rss_mb": 32, "met": ratio >= 0.8 and extra <= 32,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
