"""Errors of the MQTT link, the spool and signed command envelopes: one family under FieldnodeError.

paho-mqtt return codes and exceptions, sqlite3 errors and cryptography's ``InvalidSignature`` are turned
into these at the boundary. Each class has a stable ``code``, which command replies carry in
``error.code``.
"""

from __future__ import annotations

from device.errors import FieldnodeError, InternalError


class LinkError(FieldnodeError):
    """Base of every link error."""

    code = "link_error"


class BrokerUrlError(LinkError):
    """The broker URL is malformed (scheme, host, port) or its TLS files are missing."""

    code = "broker_url_invalid"


class ConnectError(LinkError):
    """The broker could not be reached or refused the connection."""

    code = "connect_failed"


class PublishError(LinkError):
    """A publish was refused by paho (not connected, queue full, payload too large)."""

    code = "publish_failed"


class BadInput(LinkError):
    """``fieldnode send``: the command, its arguments, the device id, prefix or request id cannot be sent as given."""

    code = "bad_input"


class SubscribeError(LinkError):
    """``fieldnode send``: the broker refused the subscription to the reply topic."""

    code = "subscribe_failed"


class NoReply(LinkError):
    """``fieldnode send``: no reply arrived within the timeout."""

    code = "no_reply"


class ReplyMalformed(LinkError):
    """``fieldnode send``: the reply to this request is not the JSON object the wire contract describes."""

    code = "reply_malformed"


class SpoolError(LinkError):
    """The on-disk spool failed (disk full, I/O error)."""

    code = "spool_error"


class SpoolCorrupt(SpoolError):
    """The spool file is not a valid database; it was moved aside and a fresh one started."""

    code = "spool_corrupt"


class EnvelopeError(LinkError):
    """A signed command envelope was refused."""

    code = "envelope_invalid"


class EnvelopeMalformed(EnvelopeError):
    """A field of the envelope is missing or has the wrong type."""

    code = "envelope_malformed"


class UnknownKey(EnvelopeError):
    """The envelope names a key that is not in the trust directory."""

    code = "unknown_key"


class BadSignature(EnvelopeError):
    """The signature does not verify over the canonical envelope."""

    code = "bad_signature"


class EnvelopeExpired(EnvelopeError):
    """The envelope's ``expires`` time has passed."""

    code = "expired"


class EnvelopeTooLong(EnvelopeError):
    """The envelope's ``expires`` is further ahead than the agent accepts (it would bloat the nonce cache)."""

    code = "expiry_too_far"


class EnvelopeReplayed(EnvelopeError):
    """The envelope's nonce was already used by that key."""

    code = "replayed"


class WrongTarget(EnvelopeError):
    """The envelope was signed for another device or another command."""

    code = "wrong_target"


class KeyFileError(EnvelopeError):
    """A signing or trust key file is unreadable, not PEM, or not an Ed25519 key of the expected kind."""

    code = "key_file_invalid"


class CommandError(LinkError):
    """The command dispatcher refused a request before (or instead of) running its handler."""

    code = "command_refused"


class PayloadTooLarge(CommandError):
    """The command payload is larger than the dispatcher accepts (checked before parsing)."""

    code = "payload_too_large"


class UnknownCommand(CommandError):
    """No command of that name is registered."""

    code = "unknown_command"


class BadJson(CommandError):
    """The payload is not UTF-8, not JSON, or not a JSON object."""

    code = "bad_json"


class BadRequest(CommandError):
    """The request object is malformed: a bad ``request_id``, an unknown field, ``args`` not an object."""

    code = "bad_request"


class RateLimited(CommandError):
    """Too many commands: the token bucket is empty; ``retry_after_s`` says when one is available."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class Unauthorized(CommandError):
    """A privileged command came without a signed envelope, or no verifier is configured."""

    code = "unauthorized"


class BadArgs(CommandError):
    """A command argument is missing, unknown, of the wrong type, out of range or not one of the choices."""

    code = "bad_args"


class BadReplyTopic(CommandError):
    """The MQTT 5 Response Topic is one the board will not publish to (a wildcard, a '$' or a board's own topic)."""

    code = "bad_reply_topic"


class CommandCrashed(CommandError, InternalError):
    """A handler (or the dispatcher) failed unexpectedly; the log has the traceback, the reply only the type.

    A defect like the CLI's :class:`~device.errors.InternalError`, so it shares that class's code."""

    code = InternalError.code


class CommandFailed(CommandError):
    """A command could not do what it was asked (the reply carries this code)."""

    code = "command_failed"


class TooSoon(CommandError):
    """A heavy command (``diag``) asked again within its cool-down; the reply says when it may run again."""

    code = "too_soon"


class NoWindow(CommandError):
    """``infer``: no complete sensor window yet (the sensor is starting, stale or disconnected)."""

    code = "no_window"
