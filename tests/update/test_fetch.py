"""Target download and the directory fetcher, against a real HTTP server and real files: resumable across dropped
connections, a server without range support and a process that died mid-download; length capped while
streaming; the finished file verified against its signed length and hash before anything reads it."""

from __future__ import annotations

import hashlib
import os

import pytest
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import TargetFile

from device.update.errors import DownloadError, HashMismatch, SizeError
from device.update.fetch import (DirectoryFetcher, DirectorySource, HttpSource, download_target, local_path,
                                 target_url)
from tests.update.httpserver import RangeServer


class NoSleep:
    """A clock whose sleeps only count (the backoff between attempts is not what these tests measure)."""

    def __init__(self):
        self.slept: list[float] = []

    def sleep(self, s: float) -> None:
        self.slept.append(s)

    def monotonic(self) -> float:
        return 0.0


@pytest.fixture
def repo(tmp_path):
    """A served directory holding one 1 MiB target under its consistent-snapshot name."""
    data = os.urandom(1 << 20)
    target = TargetFile.from_data("models/vib/full/3.tflite.age", data, ["sha256"])
    url_path = target_url("", target.path, target.hashes["sha256"]).lstrip("/")
    f = tmp_path / "www" / url_path
    f.parent.mkdir(parents=True)
    f.write_bytes(data)
    return tmp_path / "www", target, data, url_path


def test_target_url_is_the_consistent_snapshot_name():
    assert target_url("http://h/t", "models/a/b.age", "ff00") == "http://h/t/models/a/ff00.b.age"
    assert target_url("http://h/t/", "b.age", "ff00", consistent=False) == "http://h/t/b.age"


def test_a_whole_download_is_verified_and_named_by_its_hash(repo, tmp_path):
    www, target, data, path = repo
    with RangeServer(str(www)) as srv:
        seen = []
        out = download_target(target, srv.url + path, HttpSource(), str(tmp_path / "staging"),
                              progress=lambda have, n: seen.append(have))
    assert out == str(tmp_path / "staging" / target.hashes["sha256"])
    assert open(out, "rb").read() == data and seen[-1] == len(data)
    assert not os.path.exists(out + ".part")


def test_dropped_connections_resume_where_they_stopped(repo, tmp_path):
    www, target, data, path = repo
    clock = NoSleep()
    with RangeServer(str(www)) as srv:
        srv.drop_after(300_000, times=3)  # three cuts, each after 300 kB of the body
        out = download_target(target, srv.url + path, HttpSource(), str(tmp_path / "st"), clock=clock)
        ranges = [r for _p, r in srv.requests]
    assert open(out, "rb").read() == data
    offsets = [int(r[6:-1]) for r in ranges[1:]]
    assert ranges[0] is None and len(offsets) == 3  # one request per cut, none from the start again
    assert 0 < offsets[0] < offsets[1] < offsets[2] < len(data)  # each resumes past where the last one got
    assert len(clock.slept) == 3


def test_a_server_without_ranges_is_read_from_the_start_and_the_known_part_skipped(repo, tmp_path):
    www, target, data, path = repo
    with RangeServer(str(www)) as srv:
        srv.honour_ranges = False
        srv.drop_after(400_000)
        out = download_target(target, srv.url + path, HttpSource(), str(tmp_path / "st"), clock=NoSleep())
    assert open(out, "rb").read() == data


def test_a_partial_file_left_by_a_dead_process_is_resumed(repo, tmp_path):
    www, target, data, path = repo
    staging = tmp_path / "st"
    staging.mkdir()
    (staging / (target.hashes["sha256"] + ".part")).write_bytes(data[:700_000])  # what a killed download left
    with RangeServer(str(www)) as srv:
        out = download_target(target, srv.url + path, HttpSource(), str(staging))
        assert srv.requests == [("/" + path, "bytes=700000-")]
    assert open(out, "rb").read() == data


def test_too_many_failures_without_progress_keep_the_partial_file_for_later(repo, tmp_path):
    www, target, data, path = repo
    with RangeServer(str(www)) as srv:
        srv.drop_after(0, times=10)  # headers, then nothing
        with pytest.raises(DownloadError) as err:
            download_target(target, srv.url + path, HttpSource(), str(tmp_path / "st"), attempts=3, clock=NoSleep())
    assert err.value.code == "download_failed" and "resumes" in str(err.value)
    with RangeServer(str(www)) as srv:  # later: the next attempt finishes it
        assert open(download_target(target, srv.url + path, HttpSource(), str(tmp_path / "st")), "rb").read() == data


def test_a_missing_target_is_a_download_error_at_once(repo, tmp_path):
    www, target, data, path = repo
    with RangeServer(str(www)) as srv:
        with pytest.raises(DownloadError, match="not found"):
            download_target(target, srv.url + "models/nope.age", HttpSource(), str(tmp_path / "st"), clock=NoSleep())
        assert len(srv.requests) == 1


def test_more_bytes_than_signed_are_refused_while_streaming(repo, tmp_path):
    www, target, data, path = repo
    (www / path).write_bytes(data + b"x" * 100_000)  # an endless-data attack, bounded here
    with RangeServer(str(www)) as srv:
        with pytest.raises(SizeError):
            download_target(target, srv.url + path, HttpSource(), str(tmp_path / "st"))
    assert os.listdir(tmp_path / "st") == []  # nothing kept that could be read as the target


def test_a_file_whose_hash_is_not_the_signed_one_is_refused_and_discarded(repo, tmp_path):
    www, target, data, path = repo
    bad = bytearray(data)
    bad[12345] ^= 1
    (www / path).write_bytes(bytes(bad))
    with RangeServer(str(www)) as srv:
        with pytest.raises(HashMismatch) as err:
            download_target(target, srv.url + path, HttpSource(), str(tmp_path / "st"))
    assert err.value.code == "hash_mismatch" and os.listdir(tmp_path / "st") == []


def test_a_finished_file_is_checked_again_before_it_is_handed_out(repo, tmp_path, caplog):
    """A local copy damaged since it was verified is the board's problem, not the repository's: it is removed and
    downloaded again (before, it stayed, and every retry failed with hash_mismatch blaming the repository)."""
    www, target, data, path = repo
    staging = tmp_path / "st"
    staging.mkdir()
    cached = staging / target.hashes["sha256"]
    cached.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # damaged on the board
    with caplog.at_level("WARNING", logger="device.update.fetch"):
        out = download_target(target, (www / path).as_uri(), DirectorySource(), str(staging))
    assert open(out, "rb").read() == data
    assert f"the local copy {cached}" in caplog.text and "downloading it again" in caplog.text


def test_a_usb_stick_directory_serves_targets_and_metadata(repo, tmp_path):
    www, target, data, path = repo
    url = (www / path).as_uri()
    out = download_target(target, url, DirectorySource(chunk_size=100_000), str(tmp_path / "st"))
    assert hashlib.sha256(open(out, "rb").read()).hexdigest() == target.hashes["sha256"]
    fetcher = DirectoryFetcher()
    assert b"".join(fetcher.fetch(url)) == data
    with pytest.raises(DownloadHTTPError) as err:  # what ends python-tuf's walk of N+1.root.json
        list(fetcher.fetch((www / "metadata" / "2.root.json").as_uri()))
    assert err.value.status_code == 404


def test_local_path_refuses_a_remote_file_url():
    assert local_path("file:///media/usb/x%20y") == "/media/usb/x y"
    with pytest.raises(DownloadHTTPError):
        local_path("file://otherhost/x")


def test_a_full_disk_is_no_space_not_a_network_failure(repo, tmpfs):
    """A download that fills the disk says no_space at once (retrying the network would not help), and keeps what
    arrived for the next attempt."""
    from device.update.errors import NoSpace

    mnt = tmpfs(512 * 1024)
    www, target, data, path = repo  # a 1 MiB target into 512 KiB
    with RangeServer(str(www)) as srv:
        clock = NoSleep()
        with pytest.raises(NoSpace) as err:
            download_target(target, srv.url + path, HttpSource(), os.path.join(mnt, "st"), clock=clock)
        assert err.value.code == "no_space" and clock.slept == [] and len(srv.requests) == 1
    assert 0 < os.path.getsize(os.path.join(mnt, "st", target.hashes["sha256"] + ".part")) < len(data)
