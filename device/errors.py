"""The root of fieldnode's exceptions.

Every error the agent raises on purpose derives from :class:`FieldnodeError`. Each package adds a family
below it (configuration, runtime, later link and update). Exceptions from dependencies (the interpreter,
OSError, sqlite3, paho, pyserial) are translated into these where they enter our code, with ``raise ... from``.
Each error carries a stable ``code`` string that replies, status and diag can show.
"""


class FieldnodeError(Exception):
    """Base of every error fieldnode raises on purpose."""

    code = "error"

    def as_json(self) -> dict:
        """The error as data: ``{"code", "message"}`` (a family may add fields, such as the config's key)."""
        return {"code": self.code, "message": str(self)}


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

    def as_json(self) -> dict:
        """``{"code", "key", "message", "source"}``: the dotted key (``""`` for the whole file), the message
        without the source and key in front, and the file."""
        return {"code": self.code, "key": self.key_path, "message": self.message, "source": self.source}


def error_json(exc: FieldnodeError) -> dict:
    """An error as every command's ``--json`` prints it: ``{"ok": false, "error": {"code", "message", ...}}``.

    (``fieldnode send`` prints its own failures in the shape of a board's error reply, which carries the same
    ``error`` object: see :func:`device.link.wire.error_reply`.)
    """
    return {"ok": False, "error": exc.as_json()}
