"""The diagnosis: every registered check (:data:`ORDER`; their code is in :mod:`device.diag.board`,
:mod:`device.diag.config`, :mod:`device.diag.link` and :mod:`device.diag.model`) says ``OK``, ``WARN``,
``FAIL`` or ``SKIP`` with what it found and, for ``WARN`` and ``FAIL``, one line of remedy. The checks run side
by side, each bounded by the time left (:func:`run_checks`), so the whole run ends within ``budget_s`` (10 s)
whatever hangs: a check still running then is a ``FAIL`` saying so, and a check that raises is a ``FAIL``
with its error, never a traceback.

``fieldnode diag`` (:mod:`tools.diag.cli`) prints it; the agent answers the MQTT ``diag`` command with
:func:`diagnose`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from device.diag.checks import CHECKS, FAIL, OK, SKIP, STATUSES, WARN, Check, Context, Spec, Who, fail
from device.errors import Exit
from device.threads import Thread

if TYPE_CHECKING:
    from device.config import Config

ORDER = ("config", "identity", "keys", "certificate", "clock", "broker", "trust", "accelerators", "delegates",
         "models", "update_store", "sensor", "gpio", "thermal", "battery", "throttle", "cpufreq", "disk", "spool",
         "service", "agent")
BUDGET_S = 10.0
MARGIN_S = 1.0  # the checks' own deadline comes this much before the runner's, so their bounded waits fit
EXIT = {OK: Exit.OK, SKIP: Exit.OK, WARN: Exit.WARN, FAIL: Exit.FAULTS}


def load_checks() -> None:
    # Each module registers its checks in device.diag.checks.CHECKS when imported.
    import device.diag.board  # noqa: F401
    import device.diag.config  # noqa: F401
    import device.diag.link  # noqa: F401
    import device.diag.model  # noqa: F401


def run_checks(cfg: Config, *, sim: str | None = None, budget_s: float = BUDGET_S, sample_s: float = 2.0,
               on_check: Callable[[Check], None] | None = None, config_error: Exception | None = None,
               agent_status: dict | None = None, who: Who | None = None) -> list[Check]:
    """Runs every check, side by side, within ``budget_s``.

    Args:
        cfg: The configuration (with ``--sim``, ``drivers.virtual_board`` set as ``fieldnode run --sim`` does).
        sim: The virtual board profile the hardware checks run on, or None for this board's hardware.
        budget_s: The whole run's bound; each check's waits are bounded by what is left of it.
        sample_s: How long the sensor is sampled.
        on_check: Called with each :class:`Check` as soon as it and every check before it (in :data:`ORDER`)
            are done, so output streams in a stable order.
        config_error: The error the config file gave when it did not load (``cfg`` is then the defaults, with
            the keys that find the running agent, ``device.state_dir`` and ``runtime_dir``, read from the file
            where they are valid): the config check fails with it, naming the checks that need the board's
            config, which do not run (one FAIL, not a SKIP for each).
        agent_status: The agent's own status when the agent itself runs the diagnosis (the MQTT ``diag``
            command): what it holds (sensor, GPIO, spool) is read from it, never opened a second time.
        who: Who runs diag (:class:`device.diag.checks.Who`; :func:`device.diag.checks.whoami` when None).

    Returns:
        One :class:`Check` per registered check that ran, in :data:`ORDER` (with ``config_error``, only those
        that need no config).
    """
    load_checks()
    sim = sim or cfg.drivers.virtual_board or None  # a config that asks for a virtual board asks for simulation
    specs = [CHECKS[n] for n in ORDER if n in CHECKS] + [s for n, s in CHECKS.items() if n not in ORDER]
    not_run = [s.name for s in specs if config_error is not None and s.needs_config]
    specs = [s for s in specs if s.name not in not_run]  # the config check names them: one FAIL says it all
    start = time.monotonic()
    ctx = Context(cfg, sim=sim, deadline=start + max(0.5, budget_s - MARGIN_S), sample_s=sample_s, who=who)
    ctx.config_error = config_error
    ctx.not_run = not_run
    if agent_status is not None:
        ctx.use_agent_status(agent_status)
    results: list[Check | None] = [None] * len(specs)
    cond = threading.Condition()

    def one(i: int, spec: Spec) -> None:
        try:
            c = spec.fn(ctx)
            if not isinstance(c, Check) or c.name != spec.name:
                c = fail(spec.name, f"the check returned {c!r}", "this is a defect of diag: report it with a "
                                                                "diag --report bundle")
        except Exception as exc:  # a check's own failure is its verdict, never the end of diag
            logging.getLogger(__name__).debug("check %s raised", spec.name, exc_info=True)
            c = fail(spec.name, f"the check itself failed: {type(exc).__name__}: {exc}",
                     "this is a defect of diag or a broken install: send a diag --report bundle (-v shows more)")
        with cond:
            results[i] = c
            cond.notify_all()

    for i, spec in enumerate(specs):
        # Daemon threads: a check stuck past the budget must not keep the command from ending.
        Thread(target=one, args=(i, spec), name=f"diag-{spec.name}", daemon=True).start()
    out: list[Check] = []
    try:
        while len(out) < len(specs):
            with cond:
                cond.wait_for(lambda: results[len(out)] is not None, max(0.0, start + budget_s - time.monotonic()))
                ready = []
                for c in results[len(out):]:
                    if c is None:
                        break
                    ready.append(c)
            if not ready:  # the budget is spent: whatever still runs has hung; the rest are done
                with cond:
                    late = list(results[len(out):])
                for spec, c in zip(specs[len(out):], late):
                    ready.append(c if c is not None else fail(
                        spec.name, f"did not finish within {budget_s:g} s",
                        "something it waits on hangs: run diag -v, and send a diag --report bundle"))
            for c in ready:
                out.append(c)
                if on_check is not None:
                    on_check(c)
    finally:
        ctx.close()
    return out


def exit_code(checks: list[Check]) -> Exit:
    """``Exit.OK`` (0) when every check is OK or SKIP, ``Exit.WARN`` (5) on any WARN, ``Exit.FAULTS`` (6) on any
    FAIL."""
    return max((EXIT[c.status] for c in checks), default=Exit.OK)


def summary(checks: list[Check]) -> dict:
    """How many checks ended in each status: ``{"OK": n, "WARN": n, "FAIL": n, "SKIP": n}``."""
    return {s: sum(c.status == s for c in checks) for s in STATUSES}


def to_json(checks: list[Check], *, simulated: bool) -> dict:
    """The ``--json`` object: ``{"checks": [...], "summary": {...}, "exit": N, "simulated": bool}``."""
    return {"checks": [c.to_dict() for c in checks], "summary": summary(checks), "exit": exit_code(checks),
            "simulated": simulated}


def diagnose(cfg: Config, *, sim: str | None = None, agent_status: dict | None = None) -> dict:
    """The whole diagnosis as the ``--json`` object: what the MQTT ``diag`` command replies, with the agent's
    own ``status()`` as ``agent_status`` (see :func:`run_checks`). A config with ``drivers.virtual_board`` is
    diagnosed on a virtual board of that profile, and says so."""
    sim = sim or cfg.drivers.virtual_board or None
    return to_json(run_checks(cfg, sim=sim, agent_status=agent_status), simulated=bool(sim))
