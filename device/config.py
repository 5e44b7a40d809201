"""Configuration: a declarative TOML schema, its loader and its validator.

The schema is a tree of frozen dataclasses. Each section is a dataclass whose fields are declared with
:func:`setting` (a scalar key with its default, doc string and constraints) or :func:`section` (a nested
sub-table, whose type is another section dataclass). :class:`Config` is the root; a new section is added by
writing its dataclass and registering it as a :func:`section` field on :class:`Config`. One generic walker
validates any mapping against that tree, so every key gets the same checks and messages, e.g.
``runtime.threads: expected an integer from 1 to 64, got 0``. Every problem raises
:class:`device.errors.ConfigError` with the dotted ``key_path`` and the ``source``.

The file is found by :func:`resolve_path`: an explicit path (``--config PATH``), else the
``FIELDNODE_CONFIG`` environment variable, else :data:`DEFAULT_PATH`. Only a missing file at the default
path is allowed; it means "all defaults".

Run ``python -m device.config`` to print the markdown reference of every key (see docs/configuration.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from device.configschema import ValueSpec, section, setting, show, spec_of
from device.errors import ConfigError
from device.link import wire
from device.link.config import LinkConfig
from device.link.groups import groups_problem
from device.update.config import UpdateConfig
from drivers.config import DriversConfig
from power.config import PowerConfig

DEFAULT_PATH = "/etc/fieldnode/fieldnode.toml"
ENV_VAR = "FIELDNODE_CONFIG"
MACHINE_ID_PATH = "/etc/machine-id"
DEFAULTS_SOURCE = "<defaults>"

_ID_RE = r"[A-Za-z0-9_-]{1,64}"


# --------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class DeviceConfig:
    """``[device]``: identity, storage and logging of this board."""

    id: str = setting(
        "", "Device id; empty derives it from /etc/machine-id (first 12 hex digits), else the hostname.",
        pattern=_ID_RE, expect="1-64 characters from A-Z, a-z, 0-9, '_' and '-'", allow_empty=True,
    )
    state_dir: str = setting(
        "/var/lib/fieldnode", "Directory for the agent's persistent state.",
        pattern=r"(?s).*\S.*", expect="a non-empty directory path",
    )
    log_level: str = setting("info", "Minimum level of log messages.", choices=("debug", "info", "warning", "error"))
    log_format: str = setting(
        "auto", "Log line format: auto is journal under systemd (JOURNAL_STREAM: <N> priority prefixes, no "
                "timestamps) and text with timestamps in a terminal; json is one object a line.",
        choices=("auto", "journal", "text", "json"),
    )
    runtime_dir: str = setting(
        "/run/fieldnode", "Directory of the local control socket (systemd's RuntimeDirectory), where "
                          "fieldnode status finds the running agent.",
        pattern=r"(?s).*\S.*", expect="a non-empty directory path",
    )
    groups: list = setting(
        (), f"Groups this board is in (docs/fleet.md): each takes commands on fieldnode/v1/group/<group>/cmd/; "
            f"at most {wire.MAX_GROUPS} unique names of {wire.GROUP_RULE}. A signed groups.set overrides this "
            f"list until a groups.set with reset.",
    )

    def validate(self) -> list[tuple[str, str]]:
        """The rule on ``groups`` past its type: unique names of one topic level, at most a few."""
        problem = groups_problem(self.groups)
        return [("device.groups", problem)] if problem else []


@dataclass(frozen=True)
class RuntimeConfig:
    """``[runtime]``: the TFLite inference runtime and its worker process."""

    backend: str = setting(
        "auto", "Interpreter package; auto tries ai-edge-litert, then tflite-runtime.",
        choices=("auto", "litert", "tflite"),
    )
    delegate: str = setting(
        "auto", "Hardware delegate; auto lets the runtime pick one the board supports, else cpu.",
        choices=("auto", "cpu", "edgetpu", "gpu"),
    )
    edgetpu_device: str = setting(
        "", "Edge TPU to open; empty lets libedgetpu choose.",
        pattern=r"(usb|pci)(:[0-9]+)?", expect="usb, usb:N, pci or pci:N", allow_empty=True,
    )
    delegate_fallback: bool = setting(
        False, "Allow an explicit delegate (edgetpu, gpu) that cannot be used to fall back to the CPU; otherwise "
               "it is an error (delegate_unavailable) and the runtime does not serve."
    )
    gpu_delegate: str = setting(
        "", "GPU delegate library path or name; empty tries the known GPU delegate library names."
    )
    isolation: str = setting(
        "process", "Run the interpreter in a separate worker process, or inline in the agent.",
        choices=("process", "inline"),
    )
    threads: int = setting(2, "Interpreter CPU threads.", minimum=1, maximum=64)
    deadline_ms: int = setting(
        5000, "How long one inference may take before the worker is killed.", minimum=1, maximum=600000
    )
    start_timeout_s: float = setting(
        60.0, "How long a worker may take to load the model and warm up.", minimum=1, maximum=600
    )
    not_serving_retry_s: float = setting(
        60.0, "A runtime that no variant can serve retries its variants at most this often.", minimum=1,
        maximum=86400
    )
    quarantine_after: int = setting(
        3, "Consecutive worker crashes on one model file before it is quarantined.", minimum=1, maximum=100
    )
    warmup_runs: int = setting(2, "Inferences run on dummy input after loading a model.", minimum=0, maximum=100)
    model: str = setting(
        "", "Model directory containing model.json, or a single .tflite file; empty uses the bundled vibration model."
    )
    variant: str = setting(
        "auto", "Model variant to load, or auto to let the runtime choose.",
        pattern=r"(?s).*\S.*", expect="a variant name or 'auto'",
    )


@dataclass(frozen=True)
class DemoConfig:
    """``[demo]``: the demo inference loop."""

    seconds: float = setting(30.0, "How long the demo loop runs.", minimum=0, maximum=86400)


@dataclass(frozen=True)
class Config:
    """The whole configuration. Build it with :func:`load`, :func:`loads` or :func:`from_mapping`.

    Attributes:
        device: ``[device]`` section.
        runtime: ``[runtime]`` section.
        demo: ``[demo]`` section.
        drivers: ``[drivers]`` section.
        power: ``[power]`` section.
        link: ``[link]`` section.
        update: ``[update]`` section.
        source: Where the values came from: a file path, ``<string>``, ``<mapping>`` or ``<defaults>``.
            Not a configuration key; ignored when comparing configs.
    """

    device: DeviceConfig = section(DeviceConfig, "Identity, storage and logging.")
    runtime: RuntimeConfig = section(RuntimeConfig, "Inference runtime.")
    demo: DemoConfig = section(DemoConfig, "Demo loop.")
    drivers: DriversConfig = section(DriversConfig, "Hardware access.")
    power: PowerConfig = section(PowerConfig, "Power governor.")
    link: LinkConfig = section(LinkConfig, "MQTT link, spool and commands.")
    update: UpdateConfig = section(UpdateConfig, "Signed, encrypted model updates.")
    source: str = field(default=DEFAULTS_SOURCE, compare=False, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Returns the effective values as a plain nested dict (``from_mapping(cfg.to_dict()) == cfg``)."""
        return _to_dict(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """Returns a copy with some values replaced, validated exactly like a file.

        Args:
            overrides: Dotted key path to new value, e.g. ``{"runtime.threads": 1}``. A mapping value for a
                section path (``{"runtime": {"threads": 1}}``) is merged into that section.

        Returns:
            The new config; its ``source`` is this config's source.

        Raises:
            ConfigError: An override names an unknown key or has an invalid value (source ``<overrides>``).
        """
        data = self.to_dict()
        for key_path, value in overrides.items():
            _set_path(data, str(key_path), value)
        return dataclasses.replace(from_mapping(data, source="<overrides>"), source=self.source)


# ------------------------------------------------------------------------------------------- walking


def _schema_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """The configuration keys of a section dataclass: name -> (field, resolved type)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _spec(cls: type, name: str) -> ValueSpec:
    """The checker of key ``name`` of section ``cls``, built once from its declaration."""
    specs = _SPECS.get(cls)
    if specs is None:
        specs = {}
        for key, (f, tp) in _schema_fields(cls).items():
            if not _is_section(tp):
                try:
                    specs[key] = spec_of(tp, f.metadata, f.default)
                except ValueError as exc:  # a schema bug, not a user's: say which declaration
                    raise TypeError(f"config key {cls.__name__}.{key}: {exc}") from None
        _SPECS[cls] = specs
    return specs[name]


_SPECS: dict[type, dict[str, ValueSpec]] = {}


def _unknown_key(prefix: str, key: Any, value: Any, known: list[str], source: str) -> ConfigError:
    key_path = _join(prefix, str(key))
    what = "section" if isinstance(value, Mapping) else "key"
    close = difflib.get_close_matches(str(key).lower(), known, n=1, cutoff=0.6)
    hint = f"; did you mean '{_join(prefix, close[0])}'?" if close else ""
    where = f"in [{prefix}]" if prefix else "at top level"
    return ConfigError(f"unknown {what}{hint} (known keys {where}: {', '.join(sorted(known))})", key_path, source)


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    """Validates ``data`` against section dataclass ``cls`` and returns the instance."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table, got {show(data)}", prefix, source)
    schema = _schema_fields(cls)
    for key, value in data.items():
        if key not in schema:
            raise _unknown_key(prefix, key, value, list(schema), source)
    kwargs: dict[str, Any] = {}
    for name, (f, tp) in schema.items():
        if name not in data:
            continue
        key_path = _join(prefix, name)
        if _is_section(tp):
            kwargs[name] = _build(tp, data[name], key_path, source)
        else:
            spec = _spec(cls, name)
            why = spec.problem(data[name])
            if why is not None:
                raise ConfigError(why, key_path, source)
            value = spec.normalize(data[name])
            # A list is kept as a tuple: a frozen section stays immutable, comparable and hashable.
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _to_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (_f, tp) in _schema_fields(type(obj)).items():
        value = getattr(obj, name)
        out[name] = _to_dict(value) if _is_section(tp) else value
    return out


def _set_path(data: dict[str, Any], key_path: str, value: Any) -> None:
    """Sets ``key_path`` in nested dict ``data``, merging mappings into existing sub-tables."""
    parts = key_path.split(".")
    if not all(parts):
        raise ConfigError("expected a dotted key path like 'runtime.threads'", key_path, "<overrides>")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("is a value, not a table", ".".join(parts[: i + 1]), "<overrides>")
        node = child
    last = parts[-1]
    if isinstance(value, Mapping) and isinstance(node.get(last), dict):
        for sub_key, sub_value in value.items():
            _set_path(node[last], str(sub_key), sub_value)
    else:
        node[last] = dict(value) if isinstance(value, Mapping) else value


# ------------------------------------------------------------------------------------------- loading


def from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> Config:
    """Validates a nested mapping (as parsed from TOML) and builds the config.

    Args:
        data: Section name to table of keys; absent keys take their defaults.
        source: Where the data came from, for error messages and ``Config.source``.

    Returns:
        The validated config.

    Raises:
        ConfigError: Unknown key, wrong type or out-of-range value, or a rule across keys broken (see
            :func:`cross_check`); ``key_path`` is the dotted key.
    """
    cfg = _build(Config, data, "", source)
    problems = cross_check(cfg)
    if problems:
        key_path, message = problems[0]
        raise ConfigError(message, key_path, source)
    return dataclasses.replace(cfg, source=source)


def cross_check(obj: Any) -> list[tuple[str, str]]:
    """The rules no single key can check, declared next to each section as ``validate(self)``.

    Runs after every key has passed its own checks, so a section's ``validate`` sees well-typed values. A
    table's sub-tables are checked before the table itself, in schema order.

    Args:
        obj: A section instance (a :class:`Config`, or any section of it).

    Returns:
        ``(dotted key path, message)`` for each problem, in schema order; empty when the config is valid.
    """
    problems: list[tuple[str, str]] = []
    for name, (_f, tp) in _schema_fields(type(obj)).items():
        if _is_section(tp):
            problems += cross_check(getattr(obj, name))
    validate = getattr(obj, "validate", None)
    if validate is not None:
        problems += list(validate())
    return problems


def loads(text: str, source: str = "<string>") -> Config:
    """Parses and validates TOML text.

    Args:
        text: The TOML document.
        source: Name of the document for error messages and ``Config.source``.

    Returns:
        The validated config.

    Raises:
        ConfigError: Invalid TOML (with the parser's message) or an invalid value.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=source) from exc
    return from_mapping(data, source=source)


def resolve_path(path: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """Chooses the config file: ``path`` > ``$FIELDNODE_CONFIG`` > :data:`DEFAULT_PATH`.

    Args:
        path: Explicit path (the CLI's ``--config``), or None.
        environ: Environment to read ``FIELDNODE_CONFIG`` from; defaults to ``os.environ``. An empty
            value counts as unset.

    Returns:
        ``(path, explicit)``; ``explicit`` is False only for the default path, whose absence is allowed.
    """
    if path is not None:
        return os.fspath(path), True
    env = os.environ if environ is None else environ
    from_env = env.get(ENV_VAR, "")
    if from_env:
        return from_env, True
    return DEFAULT_PATH, False


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Finds, reads and validates the config file.

    Args:
        path: Explicit path (the CLI's ``--config``), or None to use ``$FIELDNODE_CONFIG`` or the default.
        environ: Environment for ``FIELDNODE_CONFIG``; defaults to ``os.environ``.

    Returns:
        The validated config; all defaults (source ``<defaults>``) if the default path does not exist.

    Raises:
        ConfigError: An explicit file is missing, any file is unreadable, not UTF-8 or not valid TOML, or a
            value is invalid. ``source`` is the file path.
    """
    resolved, explicit = resolve_path(path, environ)
    try:
        with open(resolved, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError as exc:
        if not explicit:
            return Config()
        how = f"given by {ENV_VAR}" if path is None else "given with --config"
        raise ConfigError(f"config file not found ({how})", source=resolved) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", source=resolved) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"invalid TOML: not UTF-8 ({exc.reason} at byte {exc.start})", source=resolved) from exc
    return loads(text, source=resolved)


def agent_problems(cfg: Config, user=None) -> list[tuple[str, str]]:
    """What keeps the agent (``fieldnode run``) from starting, though every tool may load the config.

    A board config must name its sensor: simulation is only ever asked for (``--sim``, or
    ``drivers.virtual_board``), never what an empty key falls back to. And the files the link needs must be
    readable (by whoever asks: run ``config check`` as the agent's user). ``fieldnode config check`` and
    ``fieldnode run`` both ask this; other tools only load the config, so a technician's ``fieldnode version``
    works on a board whose TLS key only the agent may read. The state directory must be one the agent can make or
    write, and the update root (with updates on) must be there (:mod:`device.configfiles`).

    Args:
        cfg: The configuration.
        user: The :class:`device.configfiles.Identity` the agent runs as; None asks as this process (``run``
            itself). ``config check`` and ``diag`` pass :func:`device.configfiles.service_identity`.

    Returns:
        ``(dotted key path, message)`` for each problem; empty when the agent can start.
    """
    problems = []
    d = cfg.drivers
    if not d.sensor_url and not d.virtual_board:
        problems.append(("drivers.sensor_url", "empty: set the sensor's serial port (e.g. /dev/ttyAMA0), or ask "
                                               "for a simulated board with 'fieldnode run --sim PROFILE' or "
                                               "drivers.virtual_board"))
    from device import configfiles

    why = configfiles.state_dir_problem(cfg.device.state_dir, user)
    if why:
        problems.append(("device.state_dir", why))
    if cfg.update.root_file:
        why = configfiles.root_file_problem(cfg.update.root_file)
        if why:
            problems.append(("update.root_file", why))
    return problems + cfg.link.file_problems()


def check_agent(cfg: Config, user=None) -> None:
    """Raises the first of :func:`agent_problems` (as ``user``) as a :class:`ConfigError` naming its key and the
    file."""
    for key, message in agent_problems(cfg, user):
        raise ConfigError(message, key, cfg.source)


def describe_source(cfg: Config) -> str:
    """Where ``cfg`` came from, for the first line a person reads: the file, or that there was none."""
    if cfg.source == DEFAULTS_SOURCE:
        return f"no config file at {DEFAULT_PATH}: the defaults are used"
    return cfg.source


def device_id(cfg: Config, machine_id_path: str = MACHINE_ID_PATH, hostname: str | None = None) -> str:
    """Returns this device's id.

    Args:
        cfg: The configuration; ``device.id`` wins when set.
        machine_id_path: File holding the systemd machine id (32 hex digits).
        hostname: Hostname fallback; defaults to ``socket.gethostname()``.

    Returns:
        ``device.id`` if set, else the first 12 hex digits of the machine id if readable, else the hostname
        with characters outside ``[A-Za-z0-9_-]`` replaced by ``-`` (truncated to 64; ``fieldnode`` if empty).
    """
    if cfg.device.id:
        return cfg.device.id
    try:
        with open(machine_id_path, encoding="ascii") as fh:
            machine_id = fh.read().strip().lower()
    except (OSError, UnicodeDecodeError):
        machine_id = ""
    if re.fullmatch(r"[0-9a-f]{12,}", machine_id):
        return machine_id[:12]
    name = socket.gethostname() if hostname is None else hostname
    name = re.sub(r"[^A-Za-z0-9_-]", "-", name.strip())[:64]
    return name or "fieldnode"


# ------------------------------------------------------------------------------------- documentation


def _walk(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """Yields (key path, type, field) of every scalar key; a table's own keys come before its sub-tables."""
    schema = _schema_fields(cls)
    for name, (f, tp) in schema.items():
        if not _is_section(tp):
            yield _join(prefix, name), tp, f
    for name, (f, tp) in schema.items():
        if _is_section(tp):
            yield from _walk(tp, _join(prefix, name))


def describe() -> list[tuple[str, str, object, str]]:
    """Lists every configuration key from the schema.

    Returns:
        ``(key path, type/allowed values, default, doc)`` for each key, in schema order.
    """
    return [(path, spec_of(tp, f.metadata).expected(), f.default, f.metadata["doc"]) for path, tp, f in _walk(Config)]


def toml_literal(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def render_markdown() -> str:
    """Returns the markdown table of every key (the reference in docs/configuration.md)."""
    lines = ["| Key | Type / allowed | Default | Description |", "| --- | --- | --- | --- |"]
    for key_path, type_text, default, doc in describe():
        cells = [f"`{key_path}`", type_text, f"`{toml_literal(default)}`", doc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_toml() -> str:
    """Returns a TOML file with every key at its default, each preceded by its doc as a comment."""
    out: list[str] = []
    table = None
    for key_path, type_text, default, doc in describe():
        head, _, name = key_path.rpartition(".")
        if head != table:
            out.append(("\n" if out else "") + f"[{head}]")
            table = head
        out.append(f"# {doc} ({type_text})")
        out.append(f"{name} = {toml_literal(default)}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
