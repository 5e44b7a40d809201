"""The command registry and the transport-free dispatcher behind ``<prefix>/cmd/<name>``.

The agent registers each command (:class:`Registry`) with its handler, its arguments
(:class:`device.link.cmdargs.Arg`), whether it is privileged and whether the local control socket serves it
too. The MQTT link takes ``<name>`` from the topic, calls :meth:`Dispatcher.handle` with the raw payload and
publishes the :class:`Reply` body. ``handle`` never raises; it stops at the first failure:

1. size (``payload_too_large``, before parsing); 2. known command (``unknown_command``); 3. a UTF-8 JSON
object (``bad_json``); 4. ``request_id`` and fields (``bad_request``); 5. de-duplication: a ``request_id``
seen within the window gets the cached reply byte for byte, runs nothing and uses no rate token; 6 and 7, the
token bucket (``rate_limited``) and privilege: a payload with ``sig`` is a signed envelope, verified first
(:meth:`Verifier.verify`) and then charged to a bucket of its own, so that a flood of unsigned or badly signed
commands, which drains the shared bucket, never refuses an operator's signed command; a plain request takes a
token of the shared bucket, and a privileged command without an envelope is ``unauthorized``; 8. arguments
(``bad_args``); 9. the handler. Replies have the shape of the wire contract (:mod:`device.link.wire`): ``{"ok": true, "cmd",
"request_id", "result"}`` or ``{"ok": false, "cmd", "request_id", "error": {"code", "message"}}`` (plus
``retry_after_s`` for ``rate_limited``). A reply says whether the request was refused before its handler ran
(steps 1-8), so the link can answer refusals within a budget.

A command that came on a group's topic (``handle(name, payload, group)``) must be an envelope bound to that group
(``group:<group>``), whatever the command: a plain request there is ``unauthorized`` and the verifier checks the
binding and the board's membership. Its de-duplication key is kept apart from the board's own commands. Every reply
carries the board's id (``device``) when the dispatcher was given one, so the replies to a group command tell
their boards apart.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from device.clock import SYSTEM_CLOCK
from device.configschema import show as _show
from device.errors import FieldnodeError
from device.link import wire
from device.link.errors import (BadArgs, BadJson, BadReplyTopic, BadRequest, BadSignature, CommandCrashed,
                                CommandError, EnvelopeError, EnvelopeExpired, EnvelopeMalformed, EnvelopeReplayed,
                                EnvelopeTooLong, PayloadTooLarge, RateLimited, Unauthorized, UnknownCommand, UnknownKey,
                                WrongTarget)
from device.link.cmdargs import ARG_NAME_RE, Arg, check_args, listed  # noqa: F401 - kept importable here
from device.link.wire import REQUEST_FIELDS, REQUEST_ID_RE  # noqa: F401 - the contract's; kept importable here

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}\Z")
_ENVELOPE_ONLY = ("cmd", "device", "nonce", "expires", "key")  # with these but no "sig": a half-built envelope

Handler = Callable[[dict, "CallContext"], Any]

# The dispatcher's own reply codes (ErrorCode.BAD_JSON == "bad_json"); a handler's FieldnodeError adds its own.
ErrorCode = Enum("ErrorCode", [(c.code.upper(), c.code) for c in (
    PayloadTooLarge, UnknownCommand, BadJson, BadRequest, RateLimited, EnvelopeMalformed, WrongTarget, UnknownKey,
    BadSignature, EnvelopeExpired, EnvelopeTooLong, EnvelopeReplayed, Unauthorized, BadArgs, BadReplyTopic,
    CommandCrashed)],
    type=str, module=__name__)

# A retry of these may succeed, so their replies are never served from the de-duplication cache.
RETRIABLE_CODES = frozenset({ErrorCode.RATE_LIMITED.value, ErrorCode.INTERNAL.value})


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about the request besides its arguments."""

    cmd: str
    request_id: str | None
    signer: str | None  # the key name (trust file name) of a verified envelope, else None
    received_at: float  # wall-clock seconds when the dispatcher got the payload
    group: str | None = None  # the group whose topic the command came on (its envelope is bound to it), else None


@dataclass(frozen=True)
class Command:
    """A registered command."""

    name: str
    handler: Handler
    args: tuple[Arg, ...]
    privileged: bool
    doc: str
    local: bool = False  # also served on the local control socket (unprivileged and read-only)


class Registry:
    """The commands a board answers; the agent registers them at start (it starts empty)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._lock = threading.Lock()

    def register(self, name: str, handler: Handler, *, args: tuple[Arg, ...] = (), privileged: bool = False,
                 doc: str = "", local: bool = False) -> Command:
        """Registers a command.

        Args:
            name: ``[a-z][a-z0-9_.-]{0,63}``, e.g. ``update.install``; the last level of the command topic.
            handler: ``handler(args, ctx) -> JSON-able result``; it may raise a :class:`FieldnodeError` (its
                code goes into the reply) or ValueError/TypeError (``bad_args``).
            args: The accepted arguments; anything else is refused before the handler runs.
            privileged: Whether a signed envelope is required.
            doc: One line for help output; default the first line of the handler's docstring.
            local: Also served on the local control socket (:mod:`device.agent.controlserver`), whose trust is
                the socket's group, not a signature: only for unprivileged commands that change nothing.

        Returns:
            The registered command.

        Raises:
            ValueError: A bad or duplicate name, a handler that is not callable, args that are not unique Args,
                a privileged command marked local.
        """
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"command name {name!r}: expected [a-z][a-z0-9_.-]{{0,63}}")
        if not callable(handler):
            raise ValueError(f"command {name!r}: handler {handler!r} is not callable")
        args = tuple(args)
        if not all(isinstance(a, Arg) for a in args) or len({a.name for a in args}) != len(args):
            raise ValueError(f"command {name!r}: args must be Arg instances with unique names")
        if local and privileged:
            raise ValueError(f"command {name!r}: a privileged command cannot be local (the socket checks no "
                             f"signature)")
        doc = doc or (handler.__doc__ or "").strip().split("\n", 1)[0]
        command = Command(name, handler, args, bool(privileged), doc, bool(local))
        with self._lock:
            if name in self._commands:
                raise ValueError(f"command {name!r} is already registered")
            self._commands[name] = command
        return command

    def command(self, name: str, **kw: Any) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`; returns the function unchanged."""
        def decorate(handler: Handler) -> Handler:
            self.register(name, handler, **kw)
            return handler
        return decorate

    def get(self, name: Any) -> Command | None:
        """The command called ``name``, or None."""
        return self._commands.get(name) if isinstance(name, str) else None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._commands)

    def describe(self) -> list[dict]:
        """Every command as JSON-able ``{name, privileged, local, doc, args: [...]}``, sorted by name."""
        return [{"name": c.name, "privileged": c.privileged, "local": c.local, "doc": c.doc,
                 "args": [a.describe() for a in c.args]}
                for c in (self._commands[n] for n in self.names())]


def register_builtin(registry: Registry, *, version: str, clock=SYSTEM_CLOCK) -> None:
    """Registers the commands every agent has: ``ping`` (unprivileged, no arguments).

    Args:
        registry: Where to register them.
        version: The agent version ``ping`` reports.
        clock: Source of the wall-clock ``time`` in the reply.
    """
    def ping(args: dict, ctx: CallContext) -> dict:
        """Liveness check: answers with the board's time and agent version."""
        return {"pong": True, "time": clock.time(), "version": version}

    registry.register("ping", ping, local=True)


def run_command(command: Command, args: dict, ctx: CallContext) -> Any:
    """Runs ``command``'s handler on checked ``args``; what both transports (MQTT, the control socket) call.

    Returns:
        The handler's result, known to encode as JSON.

    Raises:
        FieldnodeError: The handler's own; BadArgs for its ValueError or TypeError; CommandCrashed for any other
            exception (SystemExit included: a handler must not end the thread) or a result that is not JSON.
    """
    try:
        result = command.handler(args, ctx)
    except FieldnodeError:
        raise
    except (ValueError, TypeError) as exc:  # the handler's own argument checks
        raise BadArgs(_short(exc)) from None
    except (Exception, SystemExit) as exc:  # a handler calling sys.exit() must not stop the command thread
        log.exception("command %s (request %s) failed", command.name, ctx.request_id)
        raise CommandCrashed(f"command '{command.name}' failed: {type(exc).__name__} (see the board's log)") \
            from None
    try:
        wire.encode(result)
    except (TypeError, ValueError, RecursionError) as exc:  # the handler's bug, so "internal" like a crash
        log.error("command %s returned a result that is not JSON: %s", command.name, _short(exc))
        raise CommandCrashed(f"command '{command.name}' returned a result that is not JSON "
                             f"({type(exc).__name__})") from None
    return result


@dataclass(frozen=True)
class Reply:
    """What the link publishes: ``body`` (compact UTF-8 JSON) and a summary for logs and tests."""

    cmd: str
    request_id: str | None
    body: bytes
    ok: bool
    code: str | None  # None on success
    cached: bool = False  # served from the de-duplication cache
    refused: bool = False  # refused before its handler ran (steps 1-8, or by the link): nothing happened


class Dispatcher:
    """Checks, de-duplicates, rate-limits, verifies and runs commands; thread-safe, never raises.

    Handlers run on the calling thread. Concurrent requests with the same ``request_id`` (and command) run the
    handler once: the later ones wait for the first and get its reply from the cache.

    Args:
        registry: The commands.
        verifier: Checks signed envelopes; None refuses every envelope and every privileged command.
        clock: ``monotonic()`` for the cache window and the token bucket, ``time()`` for ``received_at``.
        max_payload: Largest payload in bytes.
        dedupe_window_s: How long a reply is served again for its ``request_id`` (0 disables).
        dedupe_max: Most cached replies; the oldest is evicted first.
        rate_burst: Token bucket size: commands accepted back to back.
        rate_per_s: Tokens added per second.
        device: The board's id, carried in every reply (``device``) so that the replies to a group command tell
            their boards apart; None leaves it out.

    Raises:
        ValueError: A limit is out of range.
    """

    def __init__(self, registry: Registry, *, verifier=None, clock=SYSTEM_CLOCK, max_payload: int = 16384,
                 dedupe_window_s: float = 300, dedupe_max: int = 1024, rate_burst: int = 20,
                 rate_per_s: float = 5.0, device: str | None = None) -> None:
        if not (max_payload > 0 and dedupe_window_s >= 0 and dedupe_max >= 0 and rate_burst >= 1
                and rate_per_s > 0):
            raise ValueError("need max_payload > 0, dedupe_window_s >= 0, dedupe_max >= 0, rate_burst >= 1, "
                             "rate_per_s > 0")
        self.registry, self.verifier, self.max_payload = registry, verifier, max_payload
        self.device = device
        self.dedupe_window_s, self.dedupe_max = dedupe_window_s, dedupe_max
        self.rate_burst, self.rate_per_s = rate_burst, rate_per_s
        self._clock = clock
        self._cond = threading.Condition()  # guards everything below
        self._cache: OrderedDict[tuple[str, str], tuple[float, Reply]] = OrderedDict()
        self._inflight: set[tuple[str, str]] = set()
        self._waiting = 0  # threads waiting for an in-flight duplicate (tests wait for it)
        self._shared = _Bucket(rate_burst, rate_per_s, clock, "commands")
        self._signed = _Bucket(rate_burst, rate_per_s, clock, "signed commands")  # verified envelopes only
        self._counters = {"requests": 0, "ok": 0, "duplicates": 0, **{c.value: 0 for c in ErrorCode}}

    @property
    def counters(self) -> dict[str, int]:
        """``requests`` = ``ok`` + ``duplicates`` + the count of each error code (zeros included)."""
        with self._cond:
            return dict(self._counters)

    def handle(self, name: str, payload: bytes, group: str | None = None) -> Reply:
        """Runs one command request; never raises.

        Args:
            name: The command name, from the topic.
            payload: The raw message payload.
            group: The group whose command topic it came on, or None for the board's own topic. A group command
                must be an envelope bound to that group (``group:<group>``), whatever the command.

        Returns:
            The reply to publish.
        """
        try:
            return self._handle(name, payload, group)
        except Exception as exc:  # a dispatcher bug must not take the link's command thread down
            log.exception("command %r: dispatcher failed", name)
            return self._finish(_name(name), None, _error(CommandCrashed(f"dispatcher failed: {type(exc).__name__} "
                                                                         f"(see the board's log)")))

    def refuse(self, name: str, payload: bytes, error: CommandError) -> Reply:
        """The reply to a request the link refused before handing it over (e.g. ``bad_reply_topic``); never raises.

        Counted like the dispatcher's own refusals; the ``request_id`` is echoed when the payload has a valid one.

        Args:
            name: The command name, from the topic.
            payload: The raw message payload.
            error: Why it was refused.

        Returns:
            The error reply, marked ``refused``.
        """
        with self._cond:
            self._counters["requests"] += 1
        try:
            return self._finish(_name(name), self._any_request_id(payload), _error(error), refused=True)
        except Exception:  # noqa: BLE001 - never raises, like handle()
            log.exception("command %r: refusal failed", name)
            return Reply(cmd=_name(name), request_id=None, body=b"{}", ok=False, code=error.code, refused=True)

    def _handle(self, name: str, payload: bytes, group: str | None) -> Reply:
        received_at = self._clock.time()
        with self._cond:
            self._counters["requests"] += 1
        # bytes(None) or bytes("text") is a caller bug: its TypeError becomes "internal" in handle().
        cmd_name, raw, request_id = _name(name), bytes(payload), None
        try:
            if len(raw) > self.max_payload:
                raise PayloadTooLarge(f"payload is {len(raw)} bytes; commands accept at most {self.max_payload}")
            command = self.registry.get(name)
            if command is None:
                known = ", ".join(self.registry.names()) or "none"
                request_id = self._any_request_id(raw)  # so an MQTT 3.1.1 sender can tell the reply is its own
                raise UnknownCommand(f"unknown command {_show(name, typed=False)}; known: {known}")
            obj = _parse(raw)
            request_id = _request_id(obj)
            if "sig" not in obj:
                _check_fields(obj)
        except CommandError as exc:  # decided by the payload alone: recomputed on a retry, never cached
            return self._finish(cmd_name, request_id, _error(exc), refused=True)
        if request_id is None:
            return self._finish(cmd_name, None, self._execute(command, obj, None, received_at, group))
        # A group command's request id is the operator's, shared by every member: kept apart from the board's own.
        key = (cmd_name if group is None else f"{wire.group_target(group)}/{cmd_name}", request_id)
        hit = self._claim(key)
        if hit is not None:
            return hit
        reply = None
        try:
            reply = self._finish(cmd_name, request_id, self._execute(command, obj, request_id, received_at, group))
            return reply
        finally:
            with self._cond:
                if reply is not None and reply.code not in RETRIABLE_CODES and self.dedupe_max > 0:
                    self._cache[key] = (self._clock.monotonic(), reply)
                    while len(self._cache) > self.dedupe_max:
                        self._cache.popitem(last=False)
                self._inflight.discard(key)
                self._cond.notify_all()

    def _any_request_id(self, payload: bytes) -> str | None:
        """The payload's ``request_id`` if it has a valid one, else None (for refusals decided before parsing)."""
        try:
            if len(payload) <= self.max_payload:
                rid = wire.parse_object(payload).get("request_id")
                return rid if wire.request_id_problem(rid) is None else None
        except (ValueError, TypeError):  # not JSON: the reply just has no request_id
            pass
        return None

    def _claim(self, key: tuple[str, str]) -> Reply | None:
        """The cached reply for ``key``; else marks it in flight (after waiting for another thread's run)."""
        with self._cond:
            while True:
                now = self._clock.monotonic()
                # Insertion order is time order, so expired entries are all at the front.
                while self._cache and next(iter(self._cache.values()))[0] <= now - self.dedupe_window_s:
                    self._cache.popitem(last=False)
                if key in self._cache:
                    self._counters["duplicates"] += 1
                    return dataclasses.replace(self._cache[key][1], cached=True)
                if key not in self._inflight:
                    self._inflight.add(key)
                    return None
                self._waiting += 1
                self._cond.wait()
                self._waiting -= 1

    def _execute(self, command: Command, obj: dict, request_id: str | None, received_at: float,
                 group: str | None = None) -> tuple:
        """Steps 6-9; returns ``(None, result)``, ``(code, error dict)``, or ``(code, error dict, True)`` when
        refused before the handler ran."""
        try:
            if "sig" in obj:  # verified before it is charged: its bucket is the verified envelopes' own
                args, signer = self._authorize(command, obj, group)
                self._signed.take(self._cond)
            else:
                self._shared.take(self._cond)
                args, signer = self._authorize(command, obj, group)
            args = check_args(command.args, args)
        except (CommandError, EnvelopeError) as exc:
            return (*_error(exc), True)
        ctx = CallContext(cmd=command.name, request_id=request_id, signer=signer, received_at=received_at,
                          group=group)
        if signer is not None:
            log.info("command %s (request %s) signed by %s", command.name, request_id, signer)
        try:
            return None, run_command(command, args, ctx)
        except FieldnodeError as exc:
            return _error(exc)

    def signed_lane(self, name: str, payload: bytes, group: str | None = None) -> bool:
        """Whether a payload just received is an authentic envelope seen for the first time, which the link queues
        in a lane of its own (:mod:`device.link.channel`); cheap for anything else, never raises.

        Nothing is used up: :meth:`handle` verifies it again. Only a trusted key's signature over an unexpired
        envelope for this board and command, whose nonce is new, is let in (:meth:`Verifier.claim`), so neither a
        flood nor replayed copies of an operator's envelope can fill that lane.
        """
        if self.verifier is None or b'"sig"' not in payload or len(payload) > self.max_payload:
            return False
        try:
            obj = wire.parse_object(bytes(payload))
            return "sig" in obj and self.registry.get(name) is not None and self.verifier.claim(obj, name, group=group)
        except (ValueError, TypeError, RecursionError):
            return False
        except Exception:  # noqa: BLE001 - the network thread calls this: a bug costs the lane, not the link
            log.exception("command %r: the signed-lane check failed", name)
            return False

    def _authorize(self, command: Command, obj: dict, group: str | None = None) -> tuple[dict, str | None]:
        """``(args, signer)``: the envelope's verified args and key name, or the plain request's args."""
        if "sig" not in obj and group is not None:
            raise Unauthorized(f"a command on group {group}'s topic must be a signed envelope bound to "
                               f"'{wire.group_target(group)}', even '{command.name}' (docs/fleet.md)")
        if "sig" not in obj:
            if command.privileged:
                raise Unauthorized(f"command '{command.name}' is privileged and needs a signed envelope "
                                   f"(docs/signing.md)")
            return obj.get("args", {}), None
        if self.verifier is None:
            raise Unauthorized(f"command '{command.name}' needs a signed envelope that this board can verify, "
                               f"but no verifier (trust store) is configured")
        verified = self.verifier.verify(obj, command.name, group=group)
        return verified.args, verified.key_name or verified.key_id

    def _finish(self, cmd: str, request_id: str | None, outcome: tuple, refused: bool = False) -> Reply:
        """Builds the reply body and counts it."""
        code, value, *flag = outcome
        refused = refused or bool(flag and flag[0])
        doc = (wire.ok_reply(cmd, request_id, value, self.device) if code is None
               else wire.error_reply(cmd, request_id, device=self.device, **value))
        with self._cond:
            self._counters[code or "ok"] = self._counters.get(code or "ok", 0) + 1
        return Reply(cmd=cmd, request_id=request_id, body=wire.encode(doc), ok=code is None, code=code,
                     refused=refused)


class _Bucket:
    """A token bucket of ``burst`` tokens refilled at ``per_s``; its state is guarded by the dispatcher's lock."""

    def __init__(self, burst: int, per_s: float, clock, what: str) -> None:
        self.burst, self.per_s, self.what, self._clock = float(burst), per_s, what, clock
        self._tokens, self._refilled_at = float(burst), clock.monotonic()

    def take(self, lock) -> None:
        """Takes a token.

        Raises:
            RateLimited: None is left; the message says when one will be.
        """
        with lock:
            now = self._clock.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled_at) * self.per_s)
            self._refilled_at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            wait = math.ceil((1 - self._tokens) / self.per_s * 1000) / 1000
        raise RateLimited(f"more than {self.burst:g} {self.what} in a burst (refill {self.per_s:g}/s); "
                          f"retry in {wait:g} s", retry_after_s=wait)


def _parse(raw: bytes) -> dict:
    """The payload as a JSON object; BadJson names what is wrong."""
    try:
        return wire.parse_object(raw)
    except ValueError as exc:
        raise BadJson(str(exc)) from None


def _request_id(obj: dict) -> str | None:
    rid = obj.get("request_id")
    problem = wire.request_id_problem(rid) if "request_id" in obj else None
    if problem is not None:
        raise BadRequest(f"request_id: {problem}, got {_show(rid)}")
    return rid


def _check_fields(obj: dict) -> None:
    unknown = [k for k in obj if k not in REQUEST_FIELDS]
    if unknown:
        hint = "; a signed envelope also needs 'sig'" if any(k in _ENVELOPE_ONLY for k in unknown) else ""
        raise BadRequest(f"unknown field(s) {listed(unknown)}; allowed: {', '.join(REQUEST_FIELDS)}{hint}")
    if "args" in obj and not isinstance(obj["args"], dict):
        raise BadRequest(f"args: expected a JSON object, got {_show(obj['args'])}")


def _error(exc: FieldnodeError) -> tuple:
    code = exc.code if isinstance(exc.code, str) and exc.code else "error"
    err: dict = {"code": code, "message": _short(exc, 500)}
    if isinstance(exc, RateLimited):
        err["retry_after_s"] = exc.retry_after_s
    return code, err


def _name(name: Any) -> str:
    return name if isinstance(name, str) else repr(name)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
