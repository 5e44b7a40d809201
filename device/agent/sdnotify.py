"""systemd's notify protocol, and a watchdog that pings only while the agent is really healthy.

A service of ``Type=notify`` gets ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) and says
``READY=1``, ``STATUS=...``, ``STOPPING=1`` and ``WATCHDOG=1`` there as datagrams; that is the whole protocol,
so no libsystemd. Without ``$NOTIFY_SOCKET`` (a terminal run) every call is a no-op.

The watchdog is only worth having when a hung agent stops the pings. :class:`Health` is told by each loop that
it progressed (:meth:`Health.beat`); :class:`Watchdog` pings at half of ``$WATCHDOG_USEC`` and only while every
required part beat within its bound, so a loop stuck on a worker or a read lets systemd restart the service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from device.clock import SYSTEM_CLOCK
from device.threads import Thread

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify datagrams to ``$NOTIFY_SOCKET``; never raises.

    Args:
        environ: Where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read (default: ours).
            ``NOTIFY_SOCKET`` is left in place: systemd only accepts the main process (``NotifyAccess=main``).
        pid: Our process id, compared with ``WATCHDOG_PID`` (default: ``os.getpid()``).
    """

    def __init__(self, environ=None, pid: int | None = None):
        env = os.environ if environ is None else environ
        self._env = env
        self._pid = os.getpid() if pid is None else pid
        raw = env.get("NOTIFY_SOCKET") or ""
        # "@name" is an abstract socket: its address starts with a NUL byte.
        self.address: str | None = ("\0" + raw[1:] if raw.startswith("@") else raw) or None
        self._failed = False
        self._said: str | None = None  # the last STATUS= text
        self._ready = False
        self._stopping = False

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to tell (under systemd)."""
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Sends ``lines`` as one datagram. Returns whether it was sent (``False`` when disabled or failed)."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            # A socket per datagram: a few a second at most, and nothing to close or to share between threads.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # a full receive queue must never stall a loop
                sock.sendto(data, self.address)
            return True
        except OSError as exc:
            if not self._failed:  # said once: a notify that fails every few seconds is noise
                self._failed = True
                log.debug("cannot notify %r: %s", self.address, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with a ``STATUS=`` line): the model is warm and the link has started."""
        self._said, self._ready = status, True
        return self.send("READY=1", *([_status_line(status)] if status else []))

    def status(self, text: str) -> bool:
        """A ``STATUS=`` line shown by ``systemctl status``."""
        self._said = text
        return self.send(_status_line(text))

    def status_if_changed(self, text: str) -> bool:
        """:meth:`status`, only when ``text`` differs from the last one said (a loop may call it each step), and
        only after :meth:`ready` (whose own status says how the agent started)."""
        if not self._ready or text == self._said:
            return False
        return self.status(text)

    def stopping(self) -> bool:
        """``STOPPING=1``, said once (a signal handler and the shutdown both ask)."""
        if self._stopping:
            return False
        self._stopping = True
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of ``$WATCHDOG_USEC``; ``None`` when there is no watchdog for us.

        A ``$WATCHDOG_PID`` of another process (we inherited the variables) means the watchdog is not ours.
        """
        if self.address is None:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != self._pid:
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._env.get("WATCHDOG_USEC") or 0)
        except ValueError:
            return None
        return usec / 2e6 if usec > 0 else None


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(str(text).split())  # one line: a newline would start another assignment


def describe(runtime_status: dict, broker: str, simulated: bool, level: str | None = None) -> str:
    """One line for ``systemctl status``: what serves, on what, and the link.

    Args:
        runtime_status: :meth:`device.runtime.runtime.Runtime.status`.
        broker: The broker URL (its user and password, if any, are left out), or ``""`` without a link.
        simulated: The board is virtual.
        level: The governor's level, when known.
    """
    st = runtime_status
    if st.get("serving"):
        what = (f"serving {st['model']} v{st['model_version']} ({st['variant']}) on {st['backend']}"
                f"/{st['delegate']}")
    else:
        what = f"not serving {st['model']}: {st.get('not_serving_reason') or 'no variant can serve'}"
    if "@" in broker:  # scheme://user:password@host: the status is readable by anyone on the board
        scheme, _, rest = broker.partition("://")
        broker = f"{scheme}://{rest.rpartition('@')[2]}" if rest else broker.rpartition("@")[2]
    return (f"{what}; {f'level {level}; ' if level else ''}link {broker or 'off'}"
            f"{'; SIMULATED board' if simulated else ''}")


def start_watchdog(notifier: Notifier, health: Health) -> Watchdog | None:
    """Starts a :class:`Watchdog` when systemd asked for one (``$WATCHDOG_USEC`` for our pid), else ``None``."""
    interval = notifier.watchdog_interval_s()
    if interval is None:
        return None
    w = Watchdog(notifier, health, interval)
    w.start()
    return w


class Health:
    """When each part of the agent last progressed, and whether all of them did recently enough.

    Args:
        clock: Time source (``monotonic``) of the beats and the checks.
    """

    def __init__(self, clock=SYSTEM_CLOCK):
        self.clock = clock
        self._bounds: dict = {}
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def require(self, part: str, within_s) -> None:
        """``part`` must beat at least every ``within_s`` seconds (a number, or a callable read at each check,
        for a bound that follows the plan). A required part that never beat is unhealthy."""
        with self._lock:
            self._bounds[part] = within_s

    def beat(self, part: str) -> None:
        """``part`` progressed now."""
        now = self.clock.monotonic()
        with self._lock:
            self._beats[part] = now

    def stale(self) -> list[str]:
        """The required parts that did not beat within their bound, with how long ago (for the log)."""
        now = self.clock.monotonic()
        out = []
        with self._lock:
            items = list(self._bounds.items())
            beats = dict(self._beats)
        for part, bound in items:
            limit = bound() if callable(bound) else bound
            at = beats.get(part)
            if at is None:
                out.append(f"{part} (never)")
            elif now - at > limit:
                out.append(f"{part} ({now - at:.1f} s > {limit:.1f} s)")
        return out

    def healthy(self) -> bool:
        return not self.stale()


class Watchdog:
    """A thread that sends ``WATCHDOG=1`` every ``interval_s`` while ``health`` is healthy.

    Args:
        notifier: Where the pings go.
        health: What must be healthy for a ping.
        interval_s: Real seconds between checks (half of ``$WATCHDOG_USEC``).
    """

    def __init__(self, notifier: Notifier, health: Health, interval_s: float):
        self.notifier, self.health, self.interval_s = notifier, health, interval_s
        self.pings = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said: list[str] = []

    def check(self) -> bool:
        """One check: pings when healthy. Returns whether it pinged. A change of what is stale is logged once."""
        stale = self.health.stale()
        parts = [s.split(" ")[0] for s in stale]
        if parts != self._said:  # said when it changes, not at every check
            if stale:
                log.warning("watchdog: not pinging, no progress in %s", ", ".join(stale))
            else:
                log.info("watchdog: healthy again, pinging")
        self._said = parts
        if stale or self._stop.is_set():  # no ping once stopping
            return False
        if self.notifier.watchdog():
            self.pings += 1
        return True

    def start(self) -> None:
        self._thread = Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # a bound callable that failed: no ping, and the agent goes on
                log.exception("watchdog check failed")

    def halt(self) -> None:
        """No ping from now on, without waiting for the thread (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
