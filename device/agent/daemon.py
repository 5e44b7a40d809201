"""``fieldnode run``: the agent in the foreground, as a terminal program and as a systemd service.

* **Signals**: SIGTERM and SIGINT drain (the in-flight inference ends, the threads stop, the spool commits,
  ``offline`` is published) and the exit is 0; SIGHUP asks the agent to reload its config, which the inference
  thread does at its next turn (:mod:`device.agent.reload`), never inside the handler.
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
from device.runtime import zygote

log = logging.getLogger("device.agent")


def add_arguments(p) -> None:
    from device.cliargs import nonnegative_float, sim_argument
    from device.logs import add_log_format_argument

    p.add_argument("--seconds", type=nonnegative_float, default=None,
                   help="stop after this long and exit 1 if the sensor or the runtime is faulty then "
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


def run(args) -> int:
    from device import logs
    from device.cliargs import load_config

    cfg = load_config(args)
    if args.sim:
        cfg = cfg.with_overrides({"drivers.virtual_board": args.sim})
    log_args = (getattr(args, "log_format", None), getattr(args, "verbose", False))
    logs.setup(cfg.device.log_level, log_args[0] or cfg.device.log_format, verbose=log_args[1])
    try:
        return _run(args, cfg, log_args)
    finally:
        zygote.stop()


def _run(args, cfg, log_args) -> int:
    if cfg.runtime.isolation == "process":
        start_zygote(cfg.runtime.backend)  # before the agent's own modules: the workers need none of them
    from device.agent.agent import Agent

    agent = Agent(cfg)
    agent.log_args = log_args  # a SIGHUP reload keeps --log-format and -v over the file (device.agent.reload)
    log.info("fieldnode %s: device %s, state %s, link %s%s", __version__, agent.device_id, agent.state_dir,
             cfg.link.broker or "off", f", SIMULATED board {cfg.drivers.virtual_board}" if agent.simulated else "")

    def stop(*_):
        agent.stop()  # STOPPING=1 and no more watchdog pings at once, even while an inference hangs

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    return agent.run(args.seconds)
