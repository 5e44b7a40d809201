"""``fieldnode run``: the agent in the foreground, as a terminal program and as a systemd service.

* **Signals**: SIGTERM and SIGINT drain (the in-flight inference ends, the threads stop, the spool commits,
  ``offline`` is published) and the exit is 0; SIGHUP asks the agent to reload its config, which the inference
  thread does at its next turn (:mod:`device.agent.reload`), never inside the handler. The handler only sets a
  flag, so any number of HUPs (a flood, a config manager's loop) make one reload per turn, and it is installed
  first thing, before the config is read, so a HUP during start-up is kept for the first turn instead of
  killing the agent (SIGHUP's default action). The zygote and the workers ignore SIGHUP.
* **Logs** (:mod:`device.logs`): ``<N>`` priority prefixes and no timestamps under systemd's journal, timestamps
  in a terminal, or one JSON object a line (``--log-format json``); ``-v`` logs debug messages.
* **One agent per state directory**: a second ``fieldnode run`` on the same ``device.state_dir`` says which
  process holds it and exits 1 (:mod:`device.agent.statelock`).
"""

from __future__ import annotations

import logging
import os
import signal

from device import __version__
from device.errors import Exit
from device.runtime import zygote

log = logging.getLogger("device.agent")


def add_arguments(p) -> None:
    from device.cliargs import nonnegative_float, sim_argument
    from device.logs import add_log_format_argument

    p.add_argument("--seconds", type=nonnegative_float, default=None,
                   help="stop after this long and exit 6 if the sensor or the runtime is faulty then "
                        "(default: until SIGTERM)")
    sim_argument(p, "run on a simulated board of this profile (default rpi4): simulated sensor, sysfs and "
                    "battery, and every result says so")
    add_log_format_argument(p)


def start_zygote(backend: str) -> None:
    """Forks the worker zygote (:mod:`device.runtime.zygote`) before the agent starts its first thread, so
    inference workers share the agent's Python, numpy and interpreter pages instead of loading their own.

    numpy's BLAS would start a thread per core when imported; the agent's arithmetic is too small to use
    them, and with them the process is no longer single-threaded, so the zygote could not be forked. Unless
    ``OPENBLAS_NUM_THREADS`` says otherwise (then workers are exec'd, and that is said at debug level).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if zygote.start(backend) is None:
        log.debug("inference workers are exec'd: no zygote")


class ReloadSignal:
    """SIGHUP's handler for the whole run: before the agent exists it remembers the request, then it hands each
    one to :meth:`device.agent.agent.Agent.request_reload`, which only sets a flag.

    Nothing here takes a lock or logs: a Python signal handler runs between two bytecodes of the main thread,
    possibly inside another handler, so one that took a lock (``threading.Event.set``) nested under a flood of
    HUPs until the stack overflowed, and the agent died.
    """

    def __init__(self) -> None:
        self.agent = None
        self.early = False  # a HUP came before the agent existed

    def install(self) -> None:
        """Makes this SIGHUP's handler (call it from the main thread, first thing)."""
        signal.signal(signal.SIGHUP, self)

    def __call__(self, signum: int, frame: object) -> None:
        agent = self.agent
        if agent is None:
            self.early = True
        else:
            agent.request_reload()

    def attach(self, agent) -> None:
        """From now on HUPs go to ``agent``; one that came during start-up is handed over."""
        self.agent = agent
        if self.early:
            self.early = False
            agent.request_reload()


def run(args) -> int:
    from device import logs
    from device.cliargs import load_config

    hup = ReloadSignal()
    hup.install()  # first: SIGHUP's default action ends the process, and start-up takes seconds
    cfg = load_config(args)
    if args.sim:
        cfg = cfg.with_overrides({"drivers.virtual_board": args.sim})
    log_args = (getattr(args, "log_format", None), getattr(args, "verbose", False))
    logs.setup(cfg.device.log_level, log_args[0] or cfg.device.log_format, verbose=log_args[1])
    try:
        return _run(args, cfg, log_args, hup)
    finally:
        zygote.stop()


def _run(args, cfg, log_args, hup: ReloadSignal) -> int:
    if cfg.runtime.isolation == "process":
        start_zygote(cfg.runtime.backend)  # before the agent's own modules: the workers need none of them
    from device.agent.agent import Agent

    agent = Agent(cfg)
    agent.log_args = log_args  # a SIGHUP reload keeps --log-format and -v over the file (device.agent.reload)
    log.info("fieldnode %s: device %s, state %s, link %s%s", __version__, agent.device_id, agent.state_dir,
             cfg.link.broker or "off", f", SIMULATED board {cfg.drivers.virtual_board}" if agent.simulated else "")

    stopping: list = []

    def stop(*_):
        if stopping:  # a second TERM (or a flood) runs no code that takes a lock: it could nest in the first
            return
        stopping.append(True)
        agent.stop()  # STOPPING=1 and no more watchdog pings at once, even while an inference hangs

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    hup.attach(agent)
    return Exit.FAULTS if agent.run(args.seconds) else Exit.OK  # a timed run that ended with faults
