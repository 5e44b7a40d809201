"""The few Linux process controls the agent uses (``prctl``), in one place: naming a process as ``ps`` and
``top`` show it, the signal a child gets when its parent dies, and the child subreaper that adopts orphans.

Off Linux, or without a C library, each call returns False and changes nothing.
"""

from __future__ import annotations

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, arg: int | bytes) -> bool:
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


def set_cmdline(title: bytes) -> bool:
    """Overwrites this process's command line, as ``/proc/PID/cmdline``, ``ps -f`` and ``systemctl status`` show it.

    A process forked from the agent (the zygote, a worker it forks) inherits the agent's command line, and
    ``systemctl status`` prints command lines, not the names :func:`name_process` sets: without this the three
    processes of the service look the same there. The original ``argv`` strings are overwritten in place (the
    area ``/proc/self/stat`` names, through ``/proc/self/mem``), padded with NULs; Python's ``sys.argv`` is a copy
    and does not change. The title is cut to the area's size.

    Returns:
        False when the area is unknown (not Linux, or an emulator that does not report it) or cannot be written.
    """
    import os

    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()  # from field 3 (state) on: the name may hold spaces
        start, end = int(fields[45]), int(fields[46])  # fields 48 and 49: arg_start, arg_end
        if start <= 0 or end - start < 2:
            return False
        data = title[:end - start - 1].ljust(end - start, b"\0")
        fd = os.open("/proc/self/mem", os.O_RDWR)
        try:
            return os.pwrite(fd, data, start) == len(data)
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        return False
