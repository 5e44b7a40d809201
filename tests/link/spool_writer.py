"""A writer process for the spool crash test: ``spool_writer.py PATH N``.

Opens a :class:`~device.link.spool.spool.Spool` at PATH, starts its group-commit thread and puts N results as fast as
it can (yielding the GIL every 64 puts); result ``i`` (0-based) has the payload ``b"<i>"``. Every time it sees
``durable_id`` move it prints ``durable <id>`` and flushes stdout, so the test knows which ids were committed
before it SIGKILLs the process. A writer that reaches N closes the spool and prints ``done <durable_id>``.
"""

from __future__ import annotations

import os
import sys
import time

# Runnable as a plain script from any directory: the project root goes first on the import path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from device.link.spool.spool import Kind, Spool  # noqa: E402


def main(argv: list[str]) -> int:
    """Runs the writer.

    Args:
        argv: ``[PATH, N]``.

    Returns:
        The exit status.
    """
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: spool_writer.py PATH N", file=sys.stderr)
        return 2
    path, n = argv[0], int(argv[1])
    spool = Spool(path, commit_interval_s=0.01)
    spool.start()
    seen = spool.durable_id
    print(f"start {seen}", flush=True)
    for i in range(n):
        spool.put(Kind.RESULT, "fieldnode/v1/test/result", b"%d" % i)
        if i % 64 == 63:
            # Yield the GIL now and then, as any real producer does while it waits for a sensor: a pure-Python
            # spin makes every GIL release of the commit thread cost a whole switch interval (5 ms).
            time.sleep(0)
        durable = spool.durable_id
        if durable != seen:
            seen = durable
            print(f"durable {durable}", flush=True)
    spool.close()
    print(f"done {spool.durable_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
