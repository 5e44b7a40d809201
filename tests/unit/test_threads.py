"""device.threads: OS thread names as /proc shows them, and the wake-up descriptor (real threads, real sockets)."""

from __future__ import annotations

import socket
import threading

import pytest

from device.threads import Thread, Waker, name_native_threads, name_thread, name_threads, os_name
from tests.waiting import eventually


def comm(thread: threading.Thread) -> str:
    with open(f"/proc/self/task/{thread.native_id}/comm", encoding="utf-8") as f:
        return f.read().strip()


@pytest.mark.parametrize("name, expected", [
    ("link", b"link"),
    ("fieldnode-led", b"led"),  # every thread is the agent's: the prefix says nothing
    ("sensor-/dev/ttyAMA0", b"sensor"),  # a path says nothing in 15 bytes
    ("worker-123456-stderr", b"worker-123456-s"),  # cut to 15 bytes
    ("zählwerk", b"z?hlwerk"),
])
def test_os_names(name, expected):
    assert os_name(name) == expected


@pytest.mark.parametrize("name", ["", "fieldnode-", "/dev/ttyS0"])
def test_a_name_that_says_nothing_is_refused(name):
    with pytest.raises(ValueError, match="thread name must say something"):
        os_name(name)


def test_a_thread_names_itself_as_it_starts():
    release = threading.Event()
    t = Thread(target=release.wait, name="fieldnode-spool", daemon=True)
    t.start()
    try:
        eventually(lambda: comm(t) == "spool", what="the OS name", detail=lambda: comm(t))
    finally:
        release.set()
        t.join()


def test_threads_started_elsewhere_are_named_from_outside():
    release = threading.Event()
    plain = [threading.Thread(target=release.wait, name=n, daemon=True) for n in ("sensor-/dev/pts/3", "virtual-board")]
    for t in plain:
        t.start()
    try:
        assert name_threads({"virtual-board": "sim-board"}) >= 2
        assert [comm(t) for t in plain] == ["sensor", "sim-board"]
        assert name_thread(plain[0], "again")
        assert comm(plain[0]) == "again"
    finally:
        release.set()
        for t in plain:
            t.join()
    assert not name_thread(plain[0])  # ended: nothing to name
    assert not name_thread(threading.Thread(target=lambda: None))  # never started


def test_native_threads_carrying_the_process_name_are_named():
    release = threading.Event()
    with open("/proc/self/comm", encoding="utf-8") as f:
        process = f.read().strip()
    t = threading.Thread(target=release.wait, daemon=True)  # a new thread carries the process's name
    t.start()
    try:
        assert comm(t) == process
        assert name_native_threads("infer-pool") >= 1
        assert comm(t) == "infer-pool"
        assert comm(threading.main_thread()) == process  # never the main thread, nor the caller
    finally:
        release.set()
        t.join()


def test_a_set_from_another_thread_ends_a_wait():
    w = Waker()
    try:
        threading.Thread(target=w.set, daemon=True).start()
        assert w.wait(None) == (True, False, False)
        assert w.wait(0) == (False, False, False)  # the wake-up was cleared as it was returned
    finally:
        w.close()


def test_many_sets_are_one_wake_up():
    w = Waker()
    try:
        for _ in range(1000):
            w.set()
        assert w.wait(0)[0]
        assert not w.wait(0)[0]
    finally:
        w.close()


def test_a_socket_ends_a_wait_too():
    a, b = socket.socketpair()
    w = Waker()
    try:
        assert w.wait(0, a) == (False, False, False)
        b.send(b"x")
        assert w.wait(None, a) == (False, True, False)
        assert w.wait(None, a, write=True)[1:] == (True, True)
        w.set()
        assert w.wait(None, a) == (True, True, False)
    finally:
        w.close()
        a.close()
        b.close()


def test_a_closed_waker_ignores_sets():
    w = Waker()
    w.close()
    w.set()  # a producer that outlives the waiter writes nowhere
    w.clear()
    w.close()
