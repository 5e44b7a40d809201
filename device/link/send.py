"""``fieldnode send``: the operator side of the command channel (technicians' laptops, scripts, tests).

1. :func:`build_request` checks the input and makes the payload: ``{"request_id", "args"}``, or the signed
   envelope (:func:`device.link.envelope.sign_envelope`) plus ``request_id``.
2. :func:`send` subscribes to the reply topic (waiting for the SUBACK), publishes to ``<prefix>/cmd/<CMD>`` at
   QoS 1 and waits. MQTT 5: Response Topic ``<prefix>/reply/<client id>`` and Correlation Data = request id,
   which the reply carries back. MQTT 3.1.1: the first reply on ``<prefix>/reply`` with our ``request_id``.
3. :func:`run` prints ``ok: <result>`` or ``error <code>: <message>`` (the reply JSON with ``--json``; a
   failure of its own is then a JSON object of the same shape, with the code of its error class).

Topics, request ids, the JSON encoding and the reply shape come from the wire contract (:mod:`device.link.wire`),
which the board's link imports too.

On the board itself, without ``--broker``, everything the board's own link uses comes from its config (``--config``,
else ``FIELDNODE_CONFIG``, else the default path): ``link.broker``, ``link.ca_file``, ``link.cert_file``,
``link.key_file``, ``link.username``, ``link.password_file``, ``link.prefix``, ``link.protocol`` and the device id,
so a technician types ``sudo fieldnode send status`` (the board's client key is readable by its service user and
root only). A flag given still wins over its key; a problem names the key it came from. With ``--broker`` no config
is read (an operator's laptop has none) and ``--device`` is required.

Exit codes: 0 ok reply, 1 error (or malformed) reply, 2 bad input, 3 no reply within ``--timeout``, 4 could
not connect (unreachable; TLS, authentication, publish or subscription refused). ``--timeout`` counts from the
start of the command (after Python has loaded it) and covers reading files, signing, connecting, subscribing,
publishing, waiting and disconnecting; only a host name lookup that hangs in the system resolver can exceed it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import secrets
import ssl
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.clock import SYSTEM_CLOCK
from device.errors import ConfigError
from device.link import envelope, wire
from device.link.errors import (BadInput, BrokerUrlError, ConnectError, EnvelopeError, LinkError, NoReply,
                                PublishError, ReplyMalformed, SubscribeError)
from device.link.url import BrokerUrl, TlsFiles, apply_tls, check_tls, parse_broker_url, tls_problem

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR_REPLY, EXIT_USAGE, EXIT_TIMEOUT, EXIT_CONNECT = 0, 1, 2, 3, 4
PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
KEEPALIVE_S = 30


@dataclass(frozen=True)
class Request:
    """A command ready to publish.

    Attributes:
        topic: The command topic, ``<prefix>/cmd/<CMD>``.
        payload: The JSON object to publish.
        request_id: The id the reply must carry (JSON field and MQTT 5 Correlation Data).
        prefix: The device's topic prefix.
    """

    topic: str
    payload: dict
    request_id: str
    prefix: str


def build_request(device: str, cmd: str, args: dict, *, prefix: str | None = None, request_id: str | None = None,
                  private_key=None, ttl_s: float = 60.0) -> Request:
    """Checks the input and builds the request.

    Args:
        device: The target device id (one topic level).
        cmd: The command name (one topic level).
        args: The command's arguments.
        prefix: Topic prefix; default ``fieldnode/v1/<device>``.
        request_id: Default ``send-<12 hex digits>``.
        private_key: An Ed25519 private key to sign with, or None for an unsigned request.
        ttl_s: Lifetime of a signed envelope.

    Returns:
        The request.

    Raises:
        BadInput: A device id, command or prefix with MQTT wildcards, '/' where one level is expected, or
            empty levels; args not a JSON object or not representable as JSON; a bad request id.
        EnvelopeError: Signing refused the input (e.g. ttl_s).
    """
    _check_topic("device id", device, one_level=True)
    _check_topic("command", cmd, one_level=True)
    prefix = wire.default_prefix(device) if prefix is None else prefix
    _check_topic("--prefix", prefix, one_level=False)
    if not isinstance(args, dict):
        raise BadInput(f"--args: expected a JSON object like '{{\"variant\": \"lite\"}}', got {type(args).__name__}")
    rid = wire.new_request_id() if request_id is None else request_id
    problem = wire.request_id_problem(rid)
    if problem is not None:
        raise BadInput(f"--request-id {rid!r}: {problem}")
    if private_key is None:
        payload = wire.request(rid, args)
    else:
        payload = envelope.sign_envelope(private_key, device=device, cmd=cmd, args=args, ttl_s=ttl_s)
        payload["request_id"] = rid
    _encode(payload)  # fail here, as bad input, rather than half-way through sending
    return Request(topic=wire.Topics(prefix).command(cmd), payload=payload, request_id=rid, prefix=prefix)


def send(url: BrokerUrl, request: Request, *, tls: TlsFiles = TlsFiles(), protocol: int = mqtt.MQTTv5,
         timeout_s: float = 10.0, username: str | None = None, password: bytes | None = None,
         deadline: float | None = None, clock=SYSTEM_CLOCK) -> dict:
    """Publishes one request and waits for its reply, all within ``timeout_s`` (or by ``deadline``).

    Args:
        url: The broker.
        request: From :func:`build_request`.
        tls: TLS files for ``mqtts://`` (checked with :func:`check_tls` first).
        protocol: ``mqtt.MQTTv5`` or ``mqtt.MQTTv311``.
        timeout_s: Overall time limit: connect, subscribe, publish and reply. (Only a host name lookup that
            hangs in the system resolver can take longer.)
        username: MQTT username, or None.
        password: MQTT password, or None.
        deadline: When to give up, on ``clock.monotonic()``; default ``timeout_s`` from now. :func:`run` starts
            it with the command, so reading files and signing count too.
        clock: Time source of the deadline (a seam for tests).

    Returns:
        The reply: a JSON object with ``ok`` and ``result`` or ``error``.

    Raises:
        BrokerUrlError: TLS files do not fit the URL or cannot be loaded.
        ConnectError: Unreachable, TLS or authentication refused, or the connection dropped.
        SubscribeError: The broker refused the reply subscription.
        PublishError: paho or (MQTT 5) the broker refused the publish.
        NoReply: Nothing came back in time.
        ReplyMalformed: The reply to this request broke the contract.
    """
    check_tls(url, tls)
    session = _Session(url, request, protocol, timeout_s, clock.monotonic() + timeout_s if deadline is None
                       else deadline, clock)
    if url.tls:
        apply_tls(session.client, tls)
    if username is not None:
        session.client.username_pw_set(username, password)
    try:
        session.connect(missing_cert=url.tls and not tls.cert)
        session.subscribe()
        return session.exchange()
    finally:
        session.close()


class _Session:
    """One request and its reply over one connection: paho's thread records into it, the caller waits.

    Callbacks only record and notify; each catches everything, because an exception would end paho's thread
    and leave the caller waiting for the timeout.
    """

    def __init__(self, url: BrokerUrl, request: Request, protocol: int, timeout_s: float, deadline: float,
                 clock) -> None:
        self.url, self.request, self.timeout_s = url, request, timeout_s
        self.deadline, self.clock = deadline, clock
        self.v5 = protocol == mqtt.MQTTv5
        # At most 23 characters, the length every MQTT 3.1.1 broker must accept; random, so two operators (or
        # a rerun while the old session lingers) never take over each other's connection or reply topic.
        client_id = f"fn-send-{secrets.token_hex(6)}"
        topics = wire.Topics(request.prefix)
        self.reply_topic = topics.reply_for(client_id) if self.v5 else topics.reply
        # reconnect_on_failure=False: a refused or dropped connection is an answer, not something to retry.
        self.cond = threading.Condition()
        self.client = c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                      reconnect_on_failure=False, **({} if self.v5 else {"clean_session": True}))
        guard = self._guard  # VERSION2 signatures: (client, userdata, flags|mid, reason code(s), properties)
        c.on_connect = guard(lambda _c, _u, _f, rc, _p: self._record("connack", rc))
        c.on_disconnect = guard(lambda _c, _u, _f, rc, _p: self._record("dropped", rc))
        c.on_subscribe = guard(lambda _c, _u, mid, rcs, _p: self._record("subacks", list(rcs), mid))
        c.on_publish = guard(lambda _c, _u, mid, rc, _p: self._record("pubacks", rc, mid))
        c.on_message, c.on_log = guard(self._on_message), guard(self._on_log)
        self.loop_started = False
        self.connack = self.dropped = None
        self.subacks: dict[int, list] = {}
        self.pubacks: dict[int, Any] = {}
        self.reply: dict | None = None
        self.malformed: str | None = None
        self.callback_error: str | None = None
        self.first_error: str | None = None

    def connect(self, *, missing_cert: bool) -> None:
        url = self.url
        try:
            self.client.connect_timeout = max(self.remaining(), 0.01)  # TCP connect and TLS
            self.client.connect(url.host, url.port, KEEPALIVE_S, **({"clean_start": True} if self.v5 else {}))
        except (OSError, ValueError) as exc:  # ssl.SSLError, refused, timed out, unresolvable
            raise ConnectError(f"could not connect to {url}: {_reason(exc)}") from exc
        self.client.loop_start()
        self.loop_started = True
        self._wait(lambda: self.connack is not None or self.dropped is not None)
        if self.connack is None and self.dropped is not None:
            # mosquitto checks a client certificate after a TLS 1.3 handshake, so a refused (or missing)
            # certificate shows here, as a drop before the CONNACK, with the detail in paho's error log.
            hint = "; no client certificate was given, the broker may require one" if missing_cert else ""
            raise ConnectError(f"could not connect to {url}: disconnected before CONNACK ({self._drop()}){hint}")
        if self.connack is None:
            raise ConnectError(f"could not connect to {url}: no CONNACK within {self.timeout_s:g} s")
        if self.connack.is_failure:
            raise ConnectError(f"could not connect to {url}: the broker refused the connection ({self.connack})")

    def subscribe(self) -> None:
        topic = self.reply_topic
        try:
            rc, mid = self.client.subscribe(topic, qos=1)
        except ValueError as exc:
            raise SubscribeError(f"subscribe to {topic}: {exc}") from exc
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise SubscribeError(f"subscribe to {topic}: {mqtt.error_string(rc)}")
        self._wait(lambda: mid in self.subacks or self.dropped is not None)
        if mid not in self.subacks:
            if self.dropped is not None:
                raise ConnectError(f"connection to {self.url} lost while subscribing ({self._drop()})")
            raise NoReply(f"no reply within {self.timeout_s:g} s: the broker did not acknowledge the "
                          f"subscription to {topic}")
        failed = [rc for rc in self.subacks[mid] if rc.is_failure]
        if failed:
            raise SubscribeError(f"the broker refused the subscription to {topic} ({failed[0]})")

    def exchange(self) -> dict:
        request, props = self.request, None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = request.request_id.encode("ascii")
            # Once the sender has given up, the command must not run later when an offline board reconnects.
            props.MessageExpiryInterval = max(1, math.ceil(self.remaining()))
        try:
            info = self.client.publish(request.topic, _encode(request.payload), qos=1, properties=props)
        except (ValueError, TypeError) as exc:
            raise PublishError(f"publish to {request.topic}: {exc}") from exc
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish to {request.topic}: {mqtt.error_string(info.rc)}")

        def refused() -> bool:
            return getattr(self.pubacks.get(info.mid), "is_failure", False)

        self._wait(lambda: self.reply is not None or self.malformed is not None or self.dropped is not None
                   or self.callback_error is not None or refused())
        if self.reply is not None:
            return self.reply
        if self.malformed is not None:
            raise ReplyMalformed(f"malformed reply on {self.reply_topic}: {self.malformed}")
        if self.callback_error is not None:
            raise LinkError(f"internal error while waiting for the reply: {self.callback_error}")
        if refused():
            raise PublishError(f"the broker refused the publish to {request.topic} ({self.pubacks[info.mid]})")
        if self.dropped is not None:
            raise ConnectError(f"connection to {self.url} lost while waiting for the reply ({self._drop()})")
        raise NoReply(f"no reply within {self.timeout_s:g} s on {self.reply_topic} (is the board online, and "
                      f"does it take commands on {request.topic}?)")

    def close(self) -> None:
        self.client.disconnect()  # sends DISCONNECT if connected; either way the network thread ends
        if self.loop_started:
            self.client.loop_stop()

    def remaining(self) -> float:
        """Seconds left until the deadline (never negative)."""
        return max(self.deadline - self.clock.monotonic(), 0.0)

    def _wait(self, predicate: Callable[[], object]) -> None:
        with self.cond:
            self.cond.wait_for(predicate, self.remaining())

    def _drop(self) -> str:
        return f"{self.dropped}" + (f"; {self.first_error}" if self.first_error else "")

    def _guard(self, fn: Callable) -> Callable:
        def callback(*args):
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                log.exception("send: error in a paho callback")
                with self.cond:
                    self.callback_error = self.callback_error or repr(exc)
                    self.cond.notify_all()
        return callback

    def _record(self, name: str, value: object, key: int | None = None) -> None:
        with self.cond:
            if key is None:
                setattr(self, name, value)
            else:
                getattr(self, name)[key] = value
            self.cond.notify_all()

    def _on_log(self, client, userdata, level, buf) -> None:
        log.debug("paho: %s", buf)
        if level == mqtt.MQTT_LOG_ERR:
            with self.cond:  # the first error is the cause; later ones are paho noticing the dead socket
                self.first_error = self.first_error or buf

    def _on_message(self, client, userdata, message) -> None:
        # A retained message predates this request; with a reused --request-id it could look like our reply.
        if message.retain or message.topic != self.reply_topic:
            return
        rid = self.request.request_id
        if self.v5 and getattr(message.properties, "CorrelationData", None) != rid.encode("ascii"):
            log.debug("send: ignored a reply for another request on %s", message.topic)
            return
        try:
            doc = wire.loads(bytes(message.payload).decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            doc, problem = None, f"not JSON ({exc})"
        else:
            problem = wire.reply_problem(doc)
        if not self.v5 and (not isinstance(doc, dict) or doc.get("request_id") != rid):
            log.debug("send: ignored a reply for another request on %s", message.topic)  # a shared topic
            return
        with self.cond:
            if self.reply is None and self.malformed is None:  # the first answer counts
                if problem is None:
                    self.reply = doc
                else:
                    self.malformed = f"{problem}: {_preview(message.payload)}"
                self.cond.notify_all()


# -- the command line ---------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``send`` options.

    Args:
        p: The parser of the ``send`` subcommand.
    """
    p.add_argument("cmd", metavar="CMD", help="the command name, e.g. status")
    p.add_argument("--broker", metavar="URL", help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (default: on the board, "
                                                   "link.broker and the other [link] keys of its config)")
    p.add_argument("--device", metavar="ID", help="the target device id (needed with --broker; default: this "
                                                  "board's id)")
    p.add_argument("--args", default="{}", metavar="JSON", help="the command's arguments, a JSON object (default {})")
    p.add_argument("--sign", metavar="KEY", help="sign the command with this operator key (NAME.key)")
    from device.cli import positive_seconds

    p.add_argument("--ttl", type=positive_seconds, default=60.0, metavar="S",
                   help="lifetime of a signed command in seconds (default 60)")
    p.add_argument("--timeout", type=positive_seconds, default=10.0, metavar="S",
                   help="give up after S seconds, connecting included (default 10)")
    p.add_argument("--json", action="store_true", help="print the reply as one JSON line")
    p.add_argument("--ca", metavar="FILE", help="CA certificate of the broker (mqtts://)")
    p.add_argument("--cert", metavar="FILE", help="client certificate (the operator's identity)")
    p.add_argument("--key", metavar="FILE", help="the client certificate's private key")
    p.add_argument("--username", metavar="U", help="MQTT username")
    p.add_argument("--password-file", metavar="F", help="file holding the MQTT password (never on the command line)")
    p.add_argument("--mqtt", choices=tuple(PROTOCOLS), help="protocol version (default 5, or link.protocol)")
    p.add_argument("--prefix", metavar="P", help="topic prefix (default fieldnode/v1/<device>)")
    p.add_argument("--request-id", metavar="ID", help="request id (default send-<12 hex digits>)")


def run(args: argparse.Namespace, *, clock=SYSTEM_CLOCK) -> int:
    """Sends one command and prints the reply; problems go to stderr as one line (and, with ``--json``, to stdout
    as a JSON error object of the reply's shape).

    Args:
        args: The parsed ``send`` arguments.
        clock: Time source of the ``--timeout`` deadline, which starts here (a seam for tests).

    Returns:
        0 ok reply, 1 error or malformed reply, 2 bad input, 3 no reply in time, 4 could not connect or the
        broker refused the subscription or publish.
    """
    deadline = clock.monotonic() + args.timeout
    fail = functools.partial(_fail, args)
    try:
        target = _target(args)
        url = parse_broker_url(target.broker)
        tls = TlsFiles(target.ca, target.cert, target.key)
        found = tls_problem(url, tls)
        if found is not None:  # the file's role, said as the option or config key it came from
            raise BadInput(f"{target.names[found[0]]}: {found[1]}{_board_key_hint(target, found[0], tls)}")
        username, password = _credentials(target, url)
        private_key = envelope.load_private_key(args.sign) if args.sign else None
        request = build_request(target.device, args.cmd, _parse_args(args.args), prefix=target.prefix,
                                request_id=args.request_id, private_key=private_key, ttl_s=args.ttl)
    except (BadInput, BrokerUrlError, EnvelopeError, ConfigError) as exc:
        return fail(exc, EXIT_USAGE)
    try:
        reply = send(url, request, tls=tls, protocol=PROTOCOLS[target.protocol], timeout_s=args.timeout,
                     username=username, password=password, deadline=deadline, clock=clock)
    except BrokerUrlError as exc:  # apply_tls: files that read fine but do not load (key mismatch)
        return fail(exc, EXIT_USAGE, request.request_id)
    except NoReply as exc:
        return fail(exc, EXIT_TIMEOUT, request.request_id)
    except (ConnectError, SubscribeError, PublishError) as exc:
        return fail(exc, EXIT_CONNECT, request.request_id)
    except LinkError as exc:  # ReplyMalformed, or an internal error
        return fail(exc, EXIT_ERROR_REPLY, request.request_id)
    if args.json:
        print(json.dumps(reply))
    elif reply["ok"]:
        # ensure_ascii: a reply is input from a board; escaping keeps control sequences out of the terminal.
        print("ok: " + json.dumps(reply.get("result"), indent=2, ensure_ascii=True))
    else:
        err = reply["error"]
        print(f"error {_printable(err['code'])}: {_printable(err['message'])}")
    return EXIT_OK if reply["ok"] else EXIT_ERROR_REPLY


def _fail(args: argparse.Namespace, exc: LinkError, code: int, request_id: str | None = None) -> int:
    """Reports a failure of the sender itself: one line on stderr; with ``--json`` also a JSON error object on
    stdout, shaped like an error reply, whose code (``no_reply``, ``connect_failed``...) is the error class's."""
    print(f"fieldnode send: {exc}", file=sys.stderr)
    if getattr(args, "json", False):
        doc = wire.error_reply(args.cmd, request_id or args.request_id, exc.code, str(exc))
        print(json.dumps(doc, ensure_ascii=True))
    return code


def _parse_args(text: str) -> dict:
    try:
        return wire.loads(text)  # build_request checks that it is an object
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"--args: not valid JSON ({exc})") from exc


@dataclass(frozen=True)
class _Target:
    """Where and how to send: from the flags, and on the board from its config for what no flag gave.

    ``names`` maps each role (``url``, ``ca``, ``cert``, ``key``, ``username``, ``password``) to the option or
    config key its value came from, so a problem is reported under the name the person typed or wrote.
    """

    broker: str
    device: str
    prefix: str | None
    protocol: str
    ca: str
    cert: str
    key: str
    username: str | None
    password_file: str | None
    names: dict


_FLAGS = {"url": "--broker", "ca": "--ca", "cert": "--cert", "key": "--key", "username": "--username",
          "password": "--password-file"}
_KEYS = {"url": "link.broker", "ca": "link.ca_file", "cert": "link.cert_file", "key": "link.key_file",
         "username": "link.username", "password": "link.password_file"}


def _target(args: argparse.Namespace) -> _Target:
    """The broker, device and link settings: the flags; without ``--broker``, the board's config fills the rest.

    Raises:
        BadInput: ``--broker`` without ``--device``; no ``--broker`` and no ``link.broker`` in the config.
        ConfigError: The board's config cannot be read or is invalid.
    """
    if args.broker is not None:
        if args.device is None:
            raise BadInput("--device ID is needed with --broker (which board?); on the board itself, leave out "
                           "--broker to use its config")
        return _Target(args.broker, args.device, args.prefix, args.mqtt or "5", args.ca or "", args.cert or "",
                       args.key or "", args.username, args.password_file, dict(_FLAGS))
    from device import config

    cfg = config.load(getattr(args, "config", None))
    link = cfg.link
    if not link.broker:
        where = (f"there is no config file at {config.resolve_path()[0]}" if cfg.source == config.DEFAULTS_SOURCE
                 else f"link.broker is not set in {cfg.source}")
        raise BadInput(f"no --broker given, and {where}: give --broker URL (and --device ID), or set link.broker in "
                       f"the board's config")
    given = {"ca": args.ca, "cert": args.cert, "key": args.key, "username": args.username,
             "password": args.password_file}
    names = {role: _FLAGS[role] if given.get(role) else _KEYS[role] for role in _FLAGS}
    return _Target(
        broker=link.broker, device=args.device or config.device_id(cfg), prefix=args.prefix or link.prefix or None,
        protocol=args.mqtt or link.protocol, ca=args.ca or link.ca_file, cert=args.cert or link.cert_file,
        key=args.key or link.key_file, username=args.username if args.username is not None else link.username or None,
        password_file=args.password_file or link.password_file or None, names=names)


def _board_key_hint(target: _Target, role: str, tls: TlsFiles) -> str:
    """Why a board's own TLS file may be unreadable: it belongs to the agent's user."""
    path = getattr(tls, role, "")
    if target.names.get(role, "").startswith("link.") and os.path.exists(path) and not os.access(path, os.R_OK):
        return "; the board's keys are readable by its service user and root only: run it with sudo"
    return ""


def _credentials(target: _Target, url: BrokerUrl) -> tuple[str | None, bytes | None]:
    user_name, password_name = target.names["username"], target.names["password"]
    if target.password_file and target.username is None:
        raise BadInput(f"{password_name} needs {user_name}")
    if target.username is not None:
        _utf8(user_name, target.username)
    if not target.password_file:
        return target.username, None
    try:
        with open(target.password_file, "rb") as fh:
            password = fh.read(64 * 1024)
    except OSError as exc:
        raise BadInput(f"{password_name} {target.password_file}: cannot read it ({exc.strerror or exc})") from exc
    # Editors end the file with a newline; it is not part of the password.
    password = password[:-2] if password.endswith(b"\r\n") else password.removesuffix(b"\n")
    if not url.tls:
        print(f"fieldnode send: warning: the password goes unencrypted over {url}; use mqtts://", file=sys.stderr)
    return target.username, password


def _check_topic(what: str, value: object, *, one_level: bool) -> None:
    """A topic level (device id, command) or a prefix, by the wire contract's rule (:func:`wire.topic_problem`)."""
    problem = wire.topic_problem(value, one_level=one_level)
    if problem is not None:
        raise BadInput(f"{what} {value!r}: {problem}")


def _utf8(what: str, value: str) -> None:
    try:
        value.encode("utf-8")  # argv holds undecodable bytes as lone surrogates
    except UnicodeEncodeError as exc:
        raise BadInput(f"{what} {value!r}: not valid UTF-8 ({exc.reason})") from exc


def _encode(payload: dict) -> bytes:
    try:
        return wire.encode(payload, strict=True)
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise BadInput(f"--args: not representable as JSON ({exc})") from exc




def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _preview(payload: bytes, limit: int = 200) -> str:
    text = bytes(payload[:limit]).decode("utf-8", "replace")
    return _printable(text) + ("..." if len(payload) > limit else "")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):  # SSL's text has the detail
        return exc.strerror
    return str(exc) or type(exc).__name__
