"""The root of fieldnode's exceptions.

Every error the agent raises on purpose derives from :class:`FieldnodeError`. Each package adds a family
below it (configuration, runtime, later link and update). Exceptions from dependencies (the interpreter,
OSError, sqlite3, paho, pyserial) are translated into these where they enter our code, with ``raise ... from``.
Each error carries a stable ``code`` string that replies, status and diag can show.
"""


class FieldnodeError(Exception):
    """Base of every error fieldnode raises on purpose."""

    code = "error"


class ConfigError(FieldnodeError):
    """The configuration is malformed: unreadable file, bad TOML, unknown key, wrong type or range."""

    code = "config_invalid"

    def __init__(self, message: str, key_path: str = "", source: str = ""):
        self.key_path = key_path
        self.source = source
        self.message = message  # without the source and key in front
        where = f"{source}: " if source else ""
        key = f"{key_path}: " if key_path else ""
        super().__init__(f"{where}{key}{message}")
