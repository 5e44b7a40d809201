"""Model updates: the board's install path against the same work streamed, and what a fleet's size costs a board.

Two JSON lines (issue "Secure model updates on TUF"):

``install`` – a ``--mb`` MB model (default 200; random bytes: ``fieldnode repo add-model`` does not look inside a
``.tflite``), released with ``fieldnode repo`` into a directory repository and granted to one board.

* ``ours_s`` – the board's own code, the production path: ``Repository.download`` finding the ciphertext already
  in its staging directory (as after the transfer, or a retry) and checking it with python-tuf's
  ``TargetFile.verify_length_and_hashes``, then ``Repository.decrypt_verified``: age decrypted streaming into a
  temporary file while the plaintext is hashed, checked against the signed sha256 and length, fsynced, renamed,
  directory fsynced. The refresh and the key file come before the clock starts.
* ``floor_s`` – the same work done by the most direct code (``bench_age.stream_floor``): the same plaintext
  sealed as a plain sequence of 64 KiB ChaCha20-Poly1305 chunks, read chunk by chunk from a file in one pass,
  each chunk's ciphertext hashed with SHA-256 (the verification), decrypted with ``cryptography``, its
  plaintext hashed and written to a temporary file, which is fsynced and renamed, its directory fsynced. Earlier
  figures compared against a one-shot decryption of the whole file in memory, which is slower than streaming
  (it faults in twice the file) and so flattered ours.
* ``ratio`` – the median over alternating pairs of ``floor_s / ours_s`` (target >= 0.8: ours at most 1.25x).
* ``extra_rss_mb`` – how much our path's peak RSS (``VmHWM``) grows over the idle process (after imports, a
  refresh and a warm-up install of a small release), the largest over the trials (target <= 32 MB whatever the
  size); ``floor_extra_rss_mb`` the same for the floor, for contrast.
* ``with_transfer_s`` – no target: the whole path with an empty staging directory, so ``Repository.download``
  also copies the ciphertext from the repository directory (a USB stick) and fsyncs it before verifying.

Each trial runs in its own process, so one path's peak RSS cannot hide the other's. After each, the file it
installed is hashed again (untimed); a path whose output is not the released plaintext makes the benchmark
print an ``error`` line and exit 1.

``fleet`` – one small release in three repositories, granted to 10, 1,000 and 100,000 boards. For each size (in
turn, five rounds, after untimed warm-up refreshes), a board refreshes from a fresh metadata directory through
python-tuf (``Repository.refresh``, with a counting fetcher around the directory fetcher), lists the releases and
fetches its key file (``Repository.fetch_release_key``): the bytes downloaded (metadata, key file) and the time,
median of 5 (target: 100,000 boards within 10 % of 10, bytes and time; a key file that is not one, or bytes
that differ between refreshes of one size, is an ``error`` line and exit status 1). The first 1,000 grants of each repository
are written by the repository tool's ``grant()`` as ``fieldnode repo grant`` does (fsync per file). The other
99,000 are written by the same ``grant()`` with its atomic write replaced by a write and a rename without fsync:
the files are the same in content and path, only their durability is skipped, which would take minutes. They are
encrypted to a pool of 1,000 board recipients (the measured board has its own).

Run with ``make bench`` or ``python tests/benchmarks/bench_update.py [--mb N] [--pairs N] [--fleet N ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402
from tuf.ngclient import FetcherInterface  # noqa: E402

from device.update import age  # noqa: E402
from device.update.client import Repository  # noqa: E402
from device.update.fetch import DirectoryFetcher, DirectorySource  # noqa: E402
from tests.benchmarks.bench_age import _Generated, file_sha256, seal_chunks  # noqa: E402 (the same plaintext, floor)
from tests.update.reposim import run_repo  # noqa: E402

BOARD = "board-0001"
CHUNK = 1 << 20
WARMUP = 20  # untimed refreshes before the first size: with fewer, the first size measured its cold start

_TRIAL = """
import hashlib, json, os, sys, time
sys.path.insert(0, sys.argv[1])
mode, repo_dir, work, identity, expected = sys.argv[2:7]

def peak_mb():  # VmHWM starts afresh in a new program; ru_maxrss is carried over from the parent
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

out = os.path.join(work, "out", "model.tflite")
if mode == "floor":
    from tests.benchmarks.bench_age import stream_floor
    key = bytes.fromhex(identity)

    def run(path, want):
        cipher_sha, sha = stream_floor(path, out, key, verify=True, durable=True)
        if want and cipher_sha != want:
            raise SystemExit("floor: ciphertext hash mismatch")
        return sha

    run(os.path.join(work, "small.raw"), "")  # warm up: imports, first buffers
    os.remove(out)
    before = peak_mb()
    t0 = time.perf_counter()
    sha = run(os.path.join(work, "big.raw"), expected)
    dt = time.perf_counter() - t0
else:
    from device.update.client import Repository
    with open(os.path.join(repo_dir, "metadata", "1.root.json"), "rb") as f:
        root = f.read()
    base = os.path.join(repo_dir, "")
    repo = Repository(os.path.join(work, "board", "metadata"), root=root, metadata_url=base + "metadata",
                      targets_url=base + "targets", grants_url=base + "grants")
    repo.refresh()
    releases = {r.name: r for r in repo.releases()}
    big, small = releases["bench"], releases["warmup"]
    keys = {r.name: repo.fetch_release_key(r, "board-0001", [identity]) for r in (big, small)}
    staging = os.path.join(work, "staging")

    def run(release):
        cipher = repo.download(release, staging)
        repo.decrypt_verified(cipher, keys[release.name], out, release)
        return release.plaintext_sha256

    run(small)  # warm up: imports, first buffers
    os.remove(out)
    before = peak_mb()
    t0 = time.perf_counter()
    sha = run(big)
    dt = time.perf_counter() - t0
print(json.dumps({"s": dt, "sha": sha, "idle_rss_mb": before, "extra_rss_mb": peak_mb() - before}))
"""


def _stored_target(repo_dir: str, target_path: str) -> str:
    """The consistent-snapshot file (``<sha256>.<name>``) of a target."""
    directory, _, base = target_path.rpartition("/")
    folder = os.path.join(repo_dir, "targets", *directory.split("/"))
    (found,) = [n for n in os.listdir(folder) if n.endswith("." + base) and len(n) == 65 + len(base)]
    return os.path.join(folder, found)


def _build_install_repo(tmp: str, size: int) -> dict:
    """A published repository with the ``bench`` model (``size`` bytes) and a small ``warmup`` one, both granted
    to :data:`BOARD`; and the floor's raw ChaCha20-Poly1305 files. Returns what the trials need."""
    repo_dir = os.path.join(tmp, "repo")
    model, small = os.path.join(tmp, "model.tflite"), os.path.join(tmp, "warmup.tflite")
    gen = _Generated(size)
    with open(model, "wb") as f:
        while chunk := gen.read(CHUNK):
            f.write(chunk)
    with open(small, "wb") as f:
        f.write(b"\x00" * 200_000)
    identity, recipient = age.generate_identity()
    run_repo("init", repo_dir)
    added = {}
    for name, path in (("bench", model), ("warmup", small)):
        added[name] = run_repo("add-model", repo_dir, "--model", path, "--name", name, "--variant", "full",
                               "--version", "1")
        run_repo("grant", repo_dir, "--device", BOARD, "--recipient", recipient, "--release", added[name]["release"])
    run_repo("publish", repo_dir)
    os.remove(model)
    key = ChaCha20Poly1305.generate_key()
    with open(os.path.join(tmp, "big.raw"), "wb") as f:
        raw_sha = seal_chunks(_Generated(size), f, key)
    with open(os.path.join(tmp, "small.raw"), "wb") as f:
        seal_chunks(io.BytesIO(b"\x00" * 200_000), f, key)
    stored = _stored_target(repo_dir, added["bench"]["target"])
    return {"repo": repo_dir, "identity": identity, "key": key.hex(), "raw_sha": raw_sha, "stored": stored,
            "cipher_sha": os.path.basename(stored).split(".", 1)[0], "plain_sha": added["bench"]["plaintext_sha256"]}


def _trial(mode: str, built: dict, tmp: str) -> dict:
    """One trial in a fresh process and a fresh working directory (metadata, staging, output)."""
    work = os.path.join(tmp, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "out"))
    os.makedirs(os.path.join(work, "staging"))
    for name in ("big.raw", "small.raw"):
        os.link(os.path.join(tmp, name), os.path.join(work, name))
    if mode == "ours":  # the transfer is done: the staging directory holds the ciphertext under its signed hash
        os.link(built["stored"], os.path.join(work, "staging", built["cipher_sha"]))
    secret, expected = (built["key"], built["raw_sha"]) if mode == "floor" else (built["identity"], "")
    try:
        out = subprocess.run([sys.executable, "-c", _TRIAL, ROOT, mode, built["repo"], work, secret, expected],
                             check=True, capture_output=True, text=True).stdout
        trial = json.loads(out)
        trial["written_sha"] = file_sha256(os.path.join(work, "out", "model.tflite"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return trial


def bench_install(mb: int, pairs: int) -> dict:
    """The ``install`` figure (see the module docstring)."""
    size = mb * 1000 * 1000
    with tempfile.TemporaryDirectory(prefix="fieldnode-bench-update-") as tmp:
        t0 = time.perf_counter()
        built = _build_install_repo(tmp, size)
        build_s = time.perf_counter() - t0
        ours, floors, transfers = [], [], []
        for _ in range(pairs):  # alternate, so drift in the machine's load hits both alike
            ours.append(_trial("ours", built, tmp))
            floors.append(_trial("floor", built, tmp))
            transfers.append(_trial("transfer", built, tmp))
    want = built["plain_sha"]
    wrong = sum(1 for t in ours + floors + transfers if t["sha"] != want or t["written_sha"] != want)
    if wrong:
        return {"bench": "install", "error": f"{wrong} trial(s) installed other plaintext than was released"}
    ratios = [f["s"] / o["s"] for o, f in zip(ours, floors)]
    ratio = statistics.median(ratios)
    extra = max(t["extra_rss_mb"] for t in ours)
    med = statistics.median
    return {
        "bench": "install", "plaintext_mb": mb, "pairs": pairs,
        "ours_s": round(med(t["s"] for t in ours), 3), "floor_s": round(med(t["s"] for t in floors), 3),
        "ratio": round(ratio, 3), "ratio_pairs": [round(r, 3) for r in ratios],
        "extra_rss_mb": round(extra, 1), "idle_rss_mb": round(med(t["idle_rss_mb"] for t in ours), 1),
        "floor_extra_rss_mb": round(max(t["extra_rss_mb"] for t in floors), 1),
        "with_transfer_s": round(med(t["s"] for t in transfers), 3),
        "with_transfer_extra_rss_mb": round(max(t["extra_rss_mb"] for t in transfers), 1),
        "build_s": round(build_s, 1),
        "target_ratio": ">= 0.8", "target_extra_rss_mb": "<= 32", "met": ratio >= 0.8 and extra <= 32,
    }


class CountingFetcher(FetcherInterface):
    """python-tuf's fetcher interface around another fetcher; counts the bytes and files it delivers."""

    def __init__(self, inner: FetcherInterface) -> None:
        self.inner = inner
        self.bytes = 0
        self.files: list = []

    def _fetch(self, url: str):
        chunks = self.inner._fetch(url)  # a missing file raises here (404), as it must
        self.files.append(url.rsplit("/", 1)[-1])

        def counted():
            for chunk in chunks:
                self.bytes += len(chunk)
                yield chunk

        return counted()


class CountingSource:
    """A :class:`~device.update.fetch.RangeSource` around another; counts the bytes it delivers."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.bytes = 0

    def read(self, url: str, offset: int):
        for chunk in self.inner.read(url, offset):
            self.bytes += len(chunk)
            yield chunk


def _fast_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """``write_atomic`` without its fsyncs: same file, same name, same mode; not durable."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@contextlib.contextmanager
def _without_fsync():
    from tools.repo import release as repo_release

    saved = repo_release.write_atomic
    repo_release.write_atomic = _fast_write
    try:
        yield
    finally:
        repo_release.write_atomic = saved


def _board_check(repo_dir: str, root: bytes, identity: str, state: str) -> dict:
    """One board's refresh, release list and key file from a fresh metadata directory: bytes and seconds."""
    fetcher, source = CountingFetcher(DirectoryFetcher()), CountingSource(DirectorySource())
    base = os.path.join(repo_dir, "")
    repo = Repository(os.path.join(state, "metadata"), root=root, metadata_url=base + "metadata",
                      targets_url=base + "targets", grants_url=base + "grants", fetcher=fetcher, source=source)
    t0 = time.perf_counter()
    repo.refresh()
    t1 = time.perf_counter()
    (release,) = repo.releases()
    key = repo.fetch_release_key(release, BOARD, [identity])
    t2 = time.perf_counter()
    if not key.startswith("AGE-SECRET-KEY-1"):
        raise RuntimeError("the board's key file did not hold an age identity")
    return {"metadata_bytes": fetcher.bytes, "key_bytes": source.bytes, "refresh_s": t1 - t0, "total_s": t2 - t0,
            "files": fetcher.files}


def _fleet_repo(path: str, size: int, pool: list, board_recipient: str) -> dict:
    """A published repository with one small release granted to ``size`` boards, :data:`BOARD` among them."""
    from tools.repo.meta import Repository as ToolRepository
    from tools.repo.release import grant

    model = path + ".tflite"
    with open(model, "wb") as f:
        f.write(random.Random(7).randbytes(150_000))
    run_repo("init", path)
    release = run_repo("add-model", path, "--model", model, "--name", "vibration", "--variant", "full",
                       "--version", "2")["release"]
    devices = [(BOARD, board_recipient)] + [(f"board-{i:06d}", pool[i % len(pool)]) for i in range(2, size + 1)]
    log = []
    for lot in (devices[:1000], devices[1000:]):
        if not lot:
            continue
        durable = lot[0][0] == BOARD  # the first 1,000 as the tool writes them; the rest without fsync
        t0 = time.perf_counter()
        with contextlib.nullcontext() if durable else _without_fsync():
            grant(ToolRepository(path), lot, release=release)
        log.append({"boards": len(lot), "s": round(time.perf_counter() - t0, 1), "fsync": durable})
    run_repo("publish", path)
    assert len(os.listdir(os.path.join(path, "grants", release))) == size
    with open(os.path.join(path, "metadata", "1.root.json"), "rb") as f:
        return {"root": f.read(), "grants_written": log}


def bench_fleet(sizes: list, runs: int) -> dict:
    """The ``fleet`` figure (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="fieldnode-bench-fleet-") as tmp:
        identity, recipient = age.generate_identity()
        pool = [age.generate_identity()[1] for _ in range(1000)]
        sizes = sorted(sizes)
        repos = {n: _fleet_repo(os.path.join(tmp, f"repo-{n}"), n, pool, recipient) for n in sizes}
        for i in range(WARMUP):  # imports, first reads, a cold CPU: not timed
            _board_check(os.path.join(tmp, f"repo-{sizes[0]}"), repos[sizes[0]]["root"], identity,
                         os.path.join(tmp, f"warm-{i}"))
        checks: dict = {n: [] for n in sizes}
        for i in range(runs):  # the sizes in turn, so drift in the machine's state hits each alike
            for n in sizes:
                checks[n].append(_board_check(os.path.join(tmp, f"repo-{n}"), repos[n]["root"], identity,
                                              os.path.join(tmp, f"board-{n}-{i}")))
    out = []
    for n in sizes:
        first = checks[n][0]
        if any(c["metadata_bytes"] != first["metadata_bytes"] for c in checks[n]):
            return {"bench": "fleet", "error": f"{n} boards: refreshes downloaded different metadata sizes"}
        out.append({"boards": n, "metadata_bytes": first["metadata_bytes"], "key_bytes": first["key_bytes"],
                    "total_bytes": first["metadata_bytes"] + first["key_bytes"],
                    "refresh_s": round(statistics.median(c["refresh_s"] for c in checks[n]), 4),
                    "total_s": round(statistics.median(c["total_s"] for c in checks[n]), 4),
                    "total_s_runs": [round(c["total_s"], 4) for c in checks[n]], "files": first["files"],
                    "grants_written": repos[n]["grants_written"]})
    small, large = out[0], out[-1]
    bytes_ratio = large["total_bytes"] / small["total_bytes"]
    time_ratio = large["total_s"] / small["total_s"]
    return {"bench": "fleet", "runs": runs, "sizes": out, "bytes_ratio": round(bytes_ratio, 4),
            "time_ratio": round(time_ratio, 3), "target_bytes_ratio": "<= 1.1", "target_time_ratio": "<= 1.1",
            "met": bytes_ratio <= 1.1 and time_ratio <= 1.1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=200, help="install: model size in MB (default 200)")
    p.add_argument("--pairs", type=int, default=3, help="install: alternating ours/floor pairs (default 3)")
    p.add_argument("--fleet", type=int, nargs="+", default=[10, 1000, 100_000], help="fleet sizes")
    p.add_argument("--runs", type=int, default=5, help="fleet: refreshes per size (default 5)")
    p.add_argument("--only", choices=("install", "fleet"), help="run one figure")
    args = p.parse_args()
    lines = []
    if args.only != "fleet":
        lines.append(bench_install(args.mb, args.pairs))
        print(json.dumps(lines[-1]), flush=True)
    if args.only != "install":
        try:
            lines.append(bench_fleet(args.fleet, args.runs))
        except RuntimeError as e:
            lines.append({"bench": "fleet", "error": str(e)})
        print(json.dumps(lines[-1]), flush=True)
    return 1 if any("error" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
