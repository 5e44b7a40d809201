"""age decryption: the board's streaming reader against the same work streamed in 64 KiB chunks, same run.

One JSON line:

* ``stream_s`` – ``device.update.age.decrypt`` of a ``--mb`` MB age file (default 200) from a file, hashing the
  plaintext with SHA-256 in ``on_chunk``, the plaintext written to a file (no fsync: the reader does not sync;
  ``bench_update.py`` measures the install that does).
* ``floor_s`` – the same work done by the most direct code: the same plaintext sealed as a plain sequence of
  64 KiB ChaCha20-Poly1305 chunks (counter nonces, no header), read chunk by chunk from a file, each decrypted
  with one ``ChaCha20Poly1305.decrypt`` call (``cryptography``), the plaintext hashed with SHA-256 and written to
  a file (:func:`stream_floor`). Earlier figures compared against a one-shot decryption of the whole file in memory,
  which is slower than streaming (it faults in twice the file) and so flattered the reader.
* ``ratio`` – the median over alternating pairs of ``floor_s / stream_s`` (1.0 = as fast as the floor; target
  >= 0.8).
* ``extra_rss_mb`` / ``floor_extra_rss_mb`` – how much each path's peak RSS grows in a fresh process,
  after imports and a warm-up (target for the streaming reader: <= 32 MB whatever the size).

Each trial runs in its own process so the peak RSS of one does not hide the other's. After each, the plaintext
written is hashed again (untimed): a path whose output differs from the plaintext encrypted makes the benchmark
print an ``error`` line and exit 1. Run with ``make bench`` or
``python tests/benchmarks/bench_age.py [--mb N] [--pairs N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from typing import BinaryIO

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402

from device.update import age  # noqa: E402

FLOOR_CHUNK = 64 * 1024
TAG = 16

_TRIAL = """
import hashlib, json, os, sys, time
sys.path.insert(0, sys.argv[1])
from device.update import age
from tests.benchmarks.bench_age import stream_floor

mode, path, key_or_identity, small, out = sys.argv[2:7]

def peak_mb():  # VmHWM starts afresh in a new program; ru_maxrss is carried over from the parent
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

def stream(p):
    digest = hashlib.sha256()
    with open(p, "rb") as src, open(out, "wb") as dst:
        age.decrypt(src, dst, [key_or_identity], on_chunk=digest.update)
    return digest.hexdigest()

def floor(p):
    return stream_floor(p, out, bytes.fromhex(key_or_identity))[1]

run = stream if mode == "stream" else floor
run(small)  # warm up: imports, first buffers
os.remove(out)
before = peak_mb()
t0 = time.perf_counter()
sha = run(path)
dt = time.perf_counter() - t0
print(json.dumps({"s": dt, "sha": sha, "extra_rss_mb": peak_mb() - before}))
"""


def seal_chunks(src: BinaryIO, dst: BinaryIO, key: bytes) -> str:
    """Seals ``src`` into ``dst`` as the floor reads it: 64 KiB chunks, each ChaCha20-Poly1305 with the chunk
    number as its nonce. Returns the sha256 of what was written (the ciphertext)."""
    aead, digest = ChaCha20Poly1305(key), hashlib.sha256()
    counter = 0
    while chunk := src.read(FLOOR_CHUNK):
        sealed = aead.encrypt(counter.to_bytes(12, "big"), chunk, None)
        digest.update(sealed)
        dst.write(sealed)
        counter += 1
    return digest.hexdigest()


def stream_floor(path: str, out: str, key: bytes, *, verify: bool = False, durable: bool = False) -> tuple[str, str]:
    """The floor: a file from :func:`seal_chunks` read in 64 KiB chunks, each decrypted, hashed (plaintext) and
    written to ``out``.

    Args:
        path: The sealed file.
        out: Where the plaintext goes.
        key: The ChaCha20-Poly1305 key.
        verify: Also hash each chunk of ciphertext, in the same pass (the install verifies the download's hash).
        durable: Write a temporary file, fsync it, rename it to ``out`` and fsync the directory, as the board's
            install does.

    Returns:
        The sha256 of the ciphertext (``""`` without ``verify``) and of the plaintext.
    """
    aead, plain_sha = ChaCha20Poly1305(key), hashlib.sha256()
    cipher_sha = hashlib.sha256() if verify else None
    target = out + ".part" if durable else out
    counter = 0
    with open(path, "rb") as src, open(target, "wb") as dst:
        while sealed := src.read(FLOOR_CHUNK + TAG):
            if cipher_sha is not None:
                cipher_sha.update(sealed)
            plain = aead.decrypt(counter.to_bytes(12, "big"), sealed, None)
            plain_sha.update(plain)
            dst.write(plain)
            counter += 1
        if durable:
            dst.flush()
            os.fsync(dst.fileno())
    if durable:
        os.replace(target, out)
        fd = os.open(os.path.dirname(out) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return "" if cipher_sha is None else cipher_sha.hexdigest(), plain_sha.hexdigest()


def file_sha256(path: str) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Generated:
    """The benchmark's plaintext: ``size`` seeded random bytes, read like a file (the same bytes however read)."""

    def __init__(self, size: int):
        self.left, self.rng = size, random.Random(200)

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def _trial(mode: str, path: str, key: str, small: str, out: str) -> dict:
    """One trial in a fresh process; adds the sha256 of the plaintext file it wrote (hashed after the clock)."""
    got = subprocess.run([sys.executable, "-c", _TRIAL, ROOT, mode, path, key, small, out],
                         check=True, capture_output=True, text=True).stdout
    trial = json.loads(got)
    trial["written_sha"] = file_sha256(out)
    os.remove(out)
    return trial


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=200, help="plaintext size in MB (default 200)")
    p.add_argument("--pairs", type=int, default=3, help="alternating stream/floor pairs (default 3)")
    args = p.parse_args()
    size = args.mb * 1000 * 1000
    identity, recipient = age.generate_identity()
    key = ChaCha20Poly1305.generate_key()
    with tempfile.TemporaryDirectory(prefix="fieldnode-bench-age-") as tmp:
        sealed, raw, small, out = (os.path.join(tmp, n) for n in ("big.age", "big.raw", "small", "out"))
        digest = hashlib.sha256()
        with open(sealed, "wb") as dst:  # written streaming: the benchmark host never holds the file either
            age.encrypt(_Generated(size), dst, [recipient], chunk_hook=digest.update)
        with open(raw, "wb") as dst:
            seal_chunks(_Generated(size), dst, key)
        small_age, small_raw = small + ".age", small + ".raw"
        with open(small_age, "wb") as f:
            f.write(age.encrypt_bytes(b"\x00" * 200_000, [recipient]))
        with open(small_raw, "wb") as f:
            seal_chunks(io.BytesIO(b"\x00" * 200_000), f, key)
        streams, floors = [], []
        for _ in range(args.pairs):  # alternate, so drift in the machine's load hits both alike
            streams.append(_trial("stream", sealed, identity, small_age, out))
            floors.append(_trial("floor", raw, key.hex(), small_raw, out))
    want = digest.hexdigest()
    wrong = [t for t in streams + floors if t["sha"] != want or t["written_sha"] != want]
    if wrong:
        print(json.dumps({"bench": "age", "error": f"{len(wrong)} trial(s) wrote other plaintext than was "
                                                   f"encrypted"}))
        return 1
    ratios = sorted(f["s"] / s["s"] for s, f in zip(streams, floors))
    ratio = statistics.median(ratios)
    extra = max(t["extra_rss_mb"] for t in streams)
    print(json.dumps({
        "bench": "age", "plaintext_mb": args.mb, "chunk_kib": age.CHUNK_SIZE // 1024,
        "stream_s": round(statistics.median(t["s"] for t in streams), 3),
        "floor_s": round(statistics.median(t["s"] for t in floors), 3),
        "ratio": round(ratio, 3), "ratio_pairs": [round(r, 3) for r in ratios],
        "extra_rss_mb": round(extra, 1),
        "floor_extra_rss_mb": round(max(t["extra_rss_mb"] for t in floors), 1),
        "target_ratio": ">= 0.8", "target_extra_rss_mb": "<= 32", "met": ratio >= 0.8 and extra <= 32,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
