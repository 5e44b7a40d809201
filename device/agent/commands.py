"""The agent's MQTT commands, each calling one of the few operations it needs (:class:`Ops`), not the agent.

| command | privileged | args | does |
| --- | --- | --- | --- |
| ``ping`` | no | - | liveness: version and time |
| ``status`` | no | - | runtime, governor, sensor, link, spool (the same object as ``fieldnode status``) |
| ``diag`` | no | - | ``fieldnode diag``'s checks on the board, as one object (``checks``, ``summary``) |
| ``infer`` | no | - | classifies the latest complete sensor window now |
| ``config.get`` | no | ``key`` (dotted, optional) | the effective configuration, or one key |
| ``variant`` | yes | ``variant`` (a name, or ``auto``) | pins the model variant; ``auto`` hands it back to the governor |
| ``governor`` | yes | ``level`` (a level, or ``auto``), ``ttl_s`` | overrides the power level for a while; ``auto`` ends it |
| ``governor.target`` | yes | ``hours`` (0 clears it) | how long the battery must last from now; the planner spends the energy left over the time left |
| ``quarantine.release`` | yes | ``sha256`` (as ``status`` lists it) | lifts a model file's quarantine |
| ``update.status`` | no | - | installed versions, floors, failed versions, the trial, the last install |
| ``update.check`` | yes | - | starts a repository refresh and replies ``started``; an ``update_check`` event says what ``update.install`` would install |
| ``update.install`` | yes | ``version`` (optional), ``force`` | starts an install and replies ``started``; ``update_install`` events follow, then the trial's |
| ``update.rollback`` | yes | ``reason`` | back to the previous model now; the version is marked failed |
| ``groups.set`` | yes | ``groups`` (a list), or ``reset`` | sets the board's groups, persisted over ``device.groups`` until ``reset`` |

The update commands are :class:`device.update.agentside.AgentUpdates`'s; their errors carry the update codes
(``update_busy``, ``model_store_error``...). A check and an install run on threads of their own (a refresh
waits on the network, an install also downloads, decrypts and validates: minutes on a slow link, and two minutes
a file against a repository that never answers), so the single command thread answers at once and never holds
``ping`` or any other command up. The commands marked local in the registry (``ping``, ``status``,
``update.status``, ``config.get``: unprivileged, read-only) are also answered on the local control socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from device import __version__
from device.link.commands import Arg, CallContext, Registry, register_builtin
from device.link.errors import CommandFailed, NoWindow
from device.runtime.quarantine import SHA256_RE


@dataclass(frozen=True)
class Ops:
    """What commands may do to the agent, and nothing more.

    Attributes:
        clock: The agent's clock (``ping``'s time).
        status: The agent's status (the control socket answers from the same function).
        latest_window: ``latest_window(max_age_s)``: the newest complete sensor window, or None.
        sensor_state: The sensor's state, for the message when there is no window.
        infer: Classifies a window and returns its :class:`device.results.Result`.
        config: The effective configuration as a dict.
        variants: The serving model's variant names.
        pin_variant: ``pin_variant(name_or_None, by)``: pins a variant (None: the plan decides); returns what is
            in force.
        set_level: ``set_level(level, ttl_s, by)``: a governor override (``auto`` ends it); returns the
            governor's status; raises ValueError for a level or TTL the governor refuses.
        set_target: ``set_target(hours, by)``: the governor's runtime target (0 clears it); returns the governor's
            status; raises ValueError for hours the governor refuses.
        release_quarantine: ``release_quarantine(sha256, by)``: whether a quarantined file had that digest.
        quarantined: The quarantined files, as ``status`` lists them.
        updates: :class:`device.update.agentside.AgentUpdates` (``status``, ``check``, ``start_install``,
            ``rollback``).
        diag: Runs the board's diagnostic checks and returns their JSON object, or None when not available.
        groups: The board's groups (:class:`device.link.groups.Groups`: ``set``, ``reset``, ``status``).
    """

    clock: Any
    status: Callable[[], dict]
    latest_window: Callable[[float], Any]
    sensor_state: Callable[[], str]
    infer: Callable[[Any], Any]
    config: Callable[[], dict]
    variants: Callable[[], list]
    pin_variant: Callable[[Optional[str], Optional[str]], dict]
    set_level: Callable[[str, float, str], dict]
    release_quarantine: Callable[[str, Optional[str]], bool]
    quarantined: Callable[[], Any]
    updates: Any
    diag: Optional[Callable[[], dict]] = None
    set_target: Optional[Callable[[float, str], dict]] = None
    groups: Any = None


def build_registry(ops: Ops) -> Registry:
    """The registry of the agent's commands, calling ``ops``."""
    reg = Registry()
    register_builtin(reg, version=__version__, clock=ops.clock)

    def status(args: dict, ctx: CallContext):
        return ops.status()

    def infer(args: dict, ctx: CallContext):
        window = ops.latest_window(10.0)
        if window is None:
            raise NoWindow(f"no complete sensor window in the last 10 s (sensor {ops.sensor_state()})")
        return ops.infer(window).to_dict()

    def config_get(args: dict, ctx: CallContext):
        data = ops.config()
        key = args.get("key")
        if not key:
            return data
        node = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"no configuration key {key!r}")
            node = node[part]
        return {key: node}

    def variant(args: dict, ctx: CallContext):
        name = args["variant"]
        names = ops.variants()
        if name != "auto" and name not in names:
            raise ValueError(f"variant must be 'auto' or one of {', '.join(names)}, got {name!r}")
        return ops.pin_variant(None if name == "auto" else name, ctx.signer)

    def governor(args: dict, ctx: CallContext):
        try:
            return ops.set_level(args["level"], args["ttl_s"], ctx.signer or "operator")
        except ValueError as exc:
            raise CommandFailed(str(exc)) from exc

    def governor_target(args: dict, ctx: CallContext):
        if ops.set_target is None:
            raise CommandFailed("this board's governor takes no runtime target")
        try:
            return ops.set_target(args["hours"], ctx.signer or "operator")
        except ValueError as exc:
            raise CommandFailed(str(exc)) from exc

    def quarantine_release(args: dict, ctx: CallContext):
        sha = args["sha256"]
        if not SHA256_RE.fullmatch(sha):
            raise ValueError(f"sha256 must be 64 lowercase hex characters, got {sha[:80]!r}")
        if not ops.release_quarantine(sha, ctx.signer):
            raise CommandFailed(f"no quarantined model file has the digest {sha}")
        return {"released": sha, "quarantined": ops.quarantined()}

    def diag(args: dict, ctx: CallContext):
        if ops.diag is None:
            raise CommandFailed("diag is not available on this board")
        return ops.diag()

    def update_status(args: dict, ctx: CallContext):
        return ops.updates.status()

    def update_check(args: dict, ctx: CallContext):
        return ops.updates.check(by=ctx.signer)

    def update_install(args: dict, ctx: CallContext):
        return ops.updates.start_install(args.get("version"), args["force"], by=ctx.signer)

    def update_rollback(args: dict, ctx: CallContext):
        return ops.updates.rollback(args["reason"], by=ctx.signer)

    def groups_set(args: dict, ctx: CallContext):
        if ops.groups is None:
            raise CommandFailed("groups are not available on this board")
        if args["reset"]:
            if "groups" in args:
                raise ValueError("give either groups or reset, not both")
            return ops.groups.reset(by=ctx.signer)
        if "groups" not in args:
            raise ValueError("missing groups: a list of group names (or reset: true for device.groups)")
        try:
            return ops.groups.set(list(args["groups"]), by=ctx.signer)  # ValueError names what is wrong
        except OSError as exc:
            raise CommandFailed(f"the groups could not be saved, nothing changed: {exc.strerror or exc}") from exc

    reg.register("diag", diag, doc="run fieldnode diag's checks on the board (offline ones and the broker)")
    reg.register("status", status, local=True, doc="runtime, governor, sensor, link and spool status")
    reg.register("infer", infer, doc="classify the latest sensor window now")
    reg.register("config.get", config_get, local=True, args=(Arg("key", str, doc="dotted key, e.g. runtime.threads"),),
                 doc="the effective configuration, or one key")
    reg.register("variant", variant, privileged=True,
                 args=(Arg("variant", str, required=True, doc="a variant name, or auto"),),
                 doc="pin the model variant (auto: the governor chooses)")
    reg.register("governor", governor, privileged=True,
                 args=(Arg("level", str, required=True,
                           choices=("auto", "performance", "balanced", "saver", "critical"),
                           doc="the level to force, or auto to end an override"),
                       Arg("ttl_s", (int, float), default=3600, minimum=1, maximum=7 * 86400,
                           doc="how long the override lasts")),
                 doc="override the power governor's level for ttl_s seconds")
    reg.register("governor.target", governor_target, privileged=True,
                 args=(Arg("hours", (int, float), required=True, minimum=0, maximum=8760,
                           doc="how long the battery must last from now; 0 clears the target"),),
                 doc="set the governor's runtime target: the planner spends the energy left over the time left")
    reg.register("quarantine.release", quarantine_release, privileged=True,
                 args=(Arg("sha256", str, required=True, doc="the model file's digest, as status lists it"),),
                 doc="lift a model file's quarantine; the next start or variant swap may load it again")
    reg.register("update.status", update_status, local=True,
                 doc="installed model versions, the trial in progress, the last install")
    reg.register("update.check", update_check, privileged=True,
                 doc="start refreshing the update repository (an update_check event says what update.install "
                     "would install)")
    reg.register("update.install", update_install, privileged=True,
                 args=(Arg("version", int, minimum=0, doc="the release version (default: the newest)"),
                       Arg("force", bool, default=False, doc="install even when the power governor says wait")),
                 doc="start installing a model update (update_install events follow; the new model serves on trial)")
    reg.register("update.rollback", update_rollback, privileged=True,
                 args=(Arg("reason", str, default="rolled back by an operator", doc="why, kept with the version"),),
                 doc="go back to the previous model now; the version that served is marked failed")
    reg.register("groups.set", groups_set, privileged=True,
                 args=(Arg("groups", list, doc="the board's groups: at most 32 unique names of 1-64 characters "
                                               "from A-Z, a-z, 0-9, '_' and '-'"),
                       Arg("reset", bool, default=False, doc="drop the groups set by command: device.groups again")),
                 doc="set the board's groups (persisted; they win over device.groups until a reset)")
    return reg
