"""SIGHUP: the config file read again, and what is safe to change on a running agent applied.

Applied at once:

* ``device.log_level`` and ``device.log_format`` (the log handlers are replaced; ``fieldnode run``'s
  ``--log-format`` and ``-v`` still win over the file);
* every ``power.*`` key: the next governor step decides by the new policy, from the level in force (no jump);
* ``device.groups``: in force at once (the link subscribes and unsubscribes, the retained state says so), unless a
  signed ``groups.set`` persisted the board's groups, which win until a ``groups.set`` with ``reset``;
* the operator keys in ``link.trust_dir``, read again even when the path did not change (a key added or
  removed is the usual reason to reload).

Any other changed key is named as needing a restart (``systemctl restart fieldnode``), in the log and in the
``config_reloaded`` event; a file that does not load or that ``fieldnode run`` would refuse changes nothing and
is a ``config_reload_failed`` event naming the key. So is a trust key file (or the trust directory) that cannot
be read: the keys in force stay, rather than a key being dropped by a read error while the reload reports
success (its signed commands would then fail ``unknown_key``). Everything is read and checked before anything
is applied.
"""

from __future__ import annotations

import logging

from device import config
from device.errors import ConfigError, FieldnodeError

log = logging.getLogger(__name__)

# Keys (or key prefixes) applied to a running agent.
RELOADABLE = ("device.log_level", "device.log_format", "device.groups", "power.")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two ``Config.to_dict()`` trees, sorted."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def load_again(cfg: config.Config) -> config.Config:
    """The running config's file, loaded and checked as ``fieldnode run`` would.

    A simulated run keeps its virtual board (``--sim`` is not in the file).

    Raises:
        ConfigError: The agent was not started from a file, or the file is invalid (naming the key).
    """
    if cfg.source.startswith("<"):
        raise ConfigError("this agent was not started from a config file: nothing to reload", "config", cfg.source)
    new = config.load(cfg.source)
    if cfg.drivers.virtual_board and not new.drivers.virtual_board:
        new = new.with_overrides({"drivers.virtual_board": cfg.drivers.virtual_board})
    config.check_agent(new)
    return new


def reload(agent) -> dict:
    """Reloads ``agent``'s configuration (:class:`device.agent.agent.Agent`); see the module docstring.

    Returns:
        ``{"applied": [keys], "needs_restart": [keys]}``, or ``{"error": message}`` when nothing changed
        because the file is invalid.
    """
    from device import logs
    from power.policy import Policy

    try:
        new = load_again(agent.cfg)
        policy = Policy.from_config(new.power)
        changed = changed_keys(agent.cfg.to_dict(), new.to_dict())
        trust = None
        if agent.trust is not None and "link.trust_dir" not in changed:
            try:
                trust = agent.trust.read(strict=True)  # a key that cannot be read fails the reload, naming it
            except FieldnodeError as exc:
                exc.key_path = "link.trust_dir"  # the event's key: where the file is configured
                raise
    except FieldnodeError as exc:
        log.error("reload refused, nothing changed: %s", exc)
        # The key apart too (None for a file that does not parse), so a fleet tool need not parse the message.
        agent.event("config_reload_failed", {"error": str(exc), "code": exc.code,
                                             "key": getattr(exc, "key_path", "") or None})
        return {"error": str(exc)}
    applied = [k for k in changed if k.startswith(RELOADABLE)]
    later = [k for k in changed if k not in applied]
    if any(k.startswith("device.log_") for k in applied):
        fmt, verbose = getattr(agent, "log_args", (None, False))  # the command line's, which win over the file
        logs.setup(new.device.log_level, fmt or new.device.log_format, verbose=verbose)
    if any(k.startswith("power.") for k in applied):
        agent.power.set_policy(policy)
        agent.reader.slope_window_s = policy.slope_window_s
        agent.policy = policy
    if "device.groups" in applied and getattr(agent, "groups", None) is not None:
        agent.groups.use_config(new.device.groups)
    if trust is not None:
        agent.trust.use(trust)
        applied.append("link.trust_dir keys")
    # The config in force: the old one with the applied keys taken from the new file.
    agent.cfg = agent.cfg.with_overrides({k: _get(new.to_dict(), k) for k in applied if k in changed})
    if later:
        log.warning("reloaded %s; these changed keys need a restart (systemctl restart fieldnode): %s",
                    ", ".join(applied) or "nothing", ", ".join(later))
    else:
        log.info("reloaded: %s", ", ".join(applied) or "no key changed")
    out = {"applied": applied, "needs_restart": later}
    agent.event("config_reloaded", out)
    return out


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data
