"""The age reader's memory stays O(one chunk) whatever the file's size: a 64 MiB file, written streaming (never
held in memory), decrypts with a peak RSS growth of a few MB in a fresh process, and a Python-level peak
(tracemalloc) of well under 1 MiB in this one."""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import sys
import textwrap
import tracemalloc

import pytest

from device.update import age
from tests.update.test_age import IDENTITY, RECIPIENT

SIZE = 64 * 1024 * 1024
ROOT = __file__.rsplit("/tests/", 1)[0]


class Generated(io.RawIOBase):
    """``SIZE`` pseudo-random bytes, produced as they are read."""

    def __init__(self, size: int):
        self.left, self.rng = size, random.Random(64)

    def readable(self):
        return True

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """(path, plaintext sha256) of a 64 MiB age file."""
    path = tmp_path_factory.mktemp("age") / "big.age"
    digest = hashlib.sha256()
    with open(path, "wb") as dst:
        assert age.encrypt(Generated(SIZE), dst, [RECIPIENT], chunk_hook=digest.update) == SIZE
    return path, digest.hexdigest()


# The peak is read from VmHWM, which starts afresh in a new program; ru_maxrss would not do: Linux carries it
# over from the parent (this test process, whose own peak would hide the child's).
CHILD = textwrap.dedent("""
    import hashlib, sys
    from device.update import age

    def peak_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    identity, small, big, out = sys.argv[1:5]
    with open(small, "rb") as s, open(out, "wb") as d:  # warm up: imports, the first chunk's buffers
        age.decrypt(s, d, [identity])
    before = peak_kib()
    digest = hashlib.sha256()
    with open(big, "rb") as s, open(out, "wb") as d:
        n = age.decrypt(s, d, [identity], on_chunk=digest.update)
    print(n, digest.hexdigest(), peak_kib() - before)
""")


def test_peak_rss_growth_of_a_64_mib_decrypt_is_a_few_mb(big_file, tmp_path):
    path, sha = big_file
    small = tmp_path / "small.age"
    small.write_bytes(age.encrypt_bytes(b"\x01" * (2 * age.CHUNK_SIZE + 1), [RECIPIENT]))
    result = subprocess.run([sys.executable, "-c", CHILD, IDENTITY, str(small), str(path), str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    n, got, growth_kib = result.stdout.split()
    assert int(n) == SIZE and got == sha
    assert int(growth_kib) < 4 * 1024, f"peak RSS grew by {int(growth_kib) / 1024:.1f} MiB"


def test_python_peak_of_a_64_mib_decrypt_is_under_1_mib(big_file, tmp_path):
    path, sha = big_file
    digest = hashlib.sha256()
    with open(path, "rb") as src, open(tmp_path / "out", "wb") as dst:
        tracemalloc.start()
        try:
            assert age.decrypt(src, dst, [IDENTITY], on_chunk=digest.update) == SIZE
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert digest.hexdigest() == sha
    assert peak < 1024 * 1024, f"peak {peak / 1024:.0f} KiB"
