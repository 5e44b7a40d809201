"""The few Linux process controls the agent uses (``prctl``), in one place: naming a process as ``ps`` and
``top`` show it, the signal a child gets when its parent dies, and the child subreaper that adopts orphans.

Off Linux, or without a C library, each call returns False and changes nothing.
"""

from __future__ import annotations

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, arg) -> bool:
    """``prctl(option, arg)``; False when it failed or this is not Linux."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except Exception:  # not Linux, or no libc
        return False


def name_process(name: bytes) -> bool:
    """Sets this process's name (the calling thread's, for a thread) as ``ps`` and ``top`` show it; 15 bytes at
    most."""
    return prctl(PR_SET_NAME, name[:15])
