"""``fieldnode send``: the operator side of the command channel (technicians' laptops, scripts, tests).

It builds one request and sends it over one MQTT session (:mod:`device.link.session`), then prints
``ok: <result>`` or ``error <code>: <message>`` (the reply JSON with ``--json``; a failure of its own is then a
JSON object of the same shape, with the code of its error class). An ok reply to ``status`` is printed for people,
as ``fieldnode status`` prints it (:func:`tools.status.block`); ``--json`` gives the raw object.
The password file is read as the board's link reads it (:func:`device.link.url.read_password`).
On the board itself, without ``--broker``, everything the board's own link uses comes from its config (``--config``,
else ``FIELDNODE_CONFIG``, else the default path): ``link.broker``, ``link.ca_file``, ``link.cert_file``,
``link.key_file``, ``link.username``, ``link.password_file``, ``link.prefix``, ``link.protocol`` and the device id,
so a technician types ``sudo fieldnode send status`` (the board's client key is readable by its service user and
root only). A flag given still wins over its key; a problem names the key it came from. With ``--broker`` no config
is read (an operator's laptop has none) and ``--device`` is required.

With ``--group G`` it sends to every member of a group instead, and reports who answered, failed or is missing
(:mod:`tools.fleet.groupsend`, which has its own exit table). :func:`add_connection_arguments` and
:func:`connection` are the broker options and their reading that ``fieldnode fleet`` shares.

Exit codes: 0 ok reply, 1 error (or malformed) reply, 2 bad input, 3 no reply within ``--timeout``, 4 could
not connect (unreachable; TLS, authentication, publish or subscription refused). ``--timeout`` counts from the
start of the command (after Python has loaded it) and covers reading files, signing, connecting, subscribing,
publishing, waiting and disconnecting; only a host name lookup that hangs in the system resolver can exceed it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass

from device.clock import SYSTEM_CLOCK, Clock
from device.errors import ConfigError
from device.link import envelope, wire
from device.link.errors import (BadInput, BrokerUrlError, ConnectError, EnvelopeError, LinkError, NoReply,
                                PublishError, SubscribeError)
from device.link.url import PasswordFileError, read_password
from device.link.session import PROTOCOLS, build_request, printable, send
from device.link.url import BrokerUrl, TlsFiles, parse_broker_url, tls_problem

EXIT_OK, EXIT_ERROR_REPLY, EXIT_USAGE, EXIT_TIMEOUT, EXIT_CONNECT = 0, 1, 2, 3, 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``send`` options.

    Args:
        p: The parser of the ``send`` subcommand.
    """
    from device.cliargs import positive_seconds

    p.add_argument("cmd", metavar="CMD", help="the command name, e.g. status")
    p.add_argument("--device", metavar="ID", help="the target device id (needed with --broker; default: this "
                                                  "board's id)")
    p.add_argument("--group", metavar="G", help="send to every member of group G instead: one signed envelope "
                                                "bound to group:G (--sign needed), every reply collected")
    p.add_argument("--known", metavar="FILE", help="with --group: the last online states seen (fieldnode fleet "
                                                   "status --known), so members that are offline now count")
    p.add_argument("--args", default="{}", metavar="JSON", help="the command's arguments, a JSON object (default {})")
    p.add_argument("--sign", metavar="KEY", help="sign the command with this operator key (NAME.key)")
    p.add_argument("--ttl", type=positive_seconds, default=60.0, metavar="S",
                   help="lifetime of a signed command in seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print the reply as one JSON line")
    p.add_argument("--prefix", metavar="P", help="topic prefix (default fieldnode/v1/<device>)")
    p.add_argument("--request-id", metavar="ID", help="request id (default send-<12 hex digits>)")
    add_connection_arguments(p)


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the broker, TLS, credential, protocol and ``--timeout`` options that every tool on the broker takes
    (``send``, ``fleet status``).

    Args:
        p: A subcommand's parser.
    """
    from device.cliargs import positive_seconds

    p.add_argument("--broker", metavar="URL", help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (default: on the board, "
                                                   "link.broker and the other [link] keys of its config)")
    p.add_argument("--timeout", type=positive_seconds, default=10.0, metavar="S",
                   help="give up after S seconds, connecting included (default 10)")
    p.add_argument("--ca", metavar="FILE", help="CA certificate of the broker (mqtts://)")
    p.add_argument("--cert", metavar="FILE", help="client certificate (the operator's identity)")
    p.add_argument("--key", metavar="FILE", help="the client certificate's private key")
    p.add_argument("--username", metavar="U", help="MQTT username")
    p.add_argument("--password-file", metavar="F", help="file holding the MQTT password (never on the command line)")
    p.add_argument("--mqtt", choices=tuple(PROTOCOLS), help="protocol version (default 5, or link.protocol)")


def run(args: argparse.Namespace, *, clock: Clock = SYSTEM_CLOCK) -> int:
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
    group = getattr(args, "group", None)
    try:
        target, url, tls, username, password = connection(args, need_device=group is None)
        if group is not None:
            from device.link.mqttclient import Endpoint
            from tools.fleet.groupsend import run_group

            endpoint = Endpoint(url, tls, username, password if username is not None else None, target.protocol)
            return run_group(args, endpoint, deadline=deadline, clock=clock)
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
    elif reply["ok"] and args.cmd == "status" and isinstance(reply.get("result"), dict):
        from tools.status import block

        # Input from a board: block() renders values with for_people(); control characters are escaped here too.
        result = reply["result"]
        for text in block(result, result.get("pid")):
            print(printable(text))
    elif reply["ok"]:
        # ensure_ascii: a reply is input from a board; escaping keeps control sequences out of the terminal.
        print("ok: " + json.dumps(reply.get("result"), indent=2, ensure_ascii=True))
    else:
        err = reply["error"]
        print(f"error {printable(err['code'])}: {printable(err['message'])}")
    return EXIT_OK if reply["ok"] else EXIT_ERROR_REPLY


def connection(args: argparse.Namespace, *, need_device: bool = True
               ) -> tuple[Target, BrokerUrl, TlsFiles, str | None, str | None]:
    """Where and as whom to connect, from the connection options (:func:`add_connection_arguments`) and, without
    ``--broker``, the board's config; every file is checked first.

    Args:
        args: The parsed options.
        need_device: ``--broker`` needs ``--device`` (a command to one board).

    Returns:
        ``(target, url, tls files, username, password)``.

    Raises:
        BadInput: A TLS or password file that cannot be used, named as the option or key it came from; ``--broker``
            without ``--device``; no broker at all.
        BrokerUrlError: A malformed URL. ConfigError: The board's config cannot be read.
    """
    target = _target(args, need_device=need_device)
    url = parse_broker_url(target.broker)
    tls = TlsFiles(target.ca, target.cert, target.key)
    found = tls_problem(url, tls)
    if found is not None:  # the file's role, said as the option or config key it came from
        raise BadInput(f"{target.names[found[0]]}: {found[1]}{_board_key_hint(target, found[0], tls)}")
    username, password = _credentials(target, url)
    return target, url, tls, username, password


def _fail(args: argparse.Namespace, exc: LinkError, code: int, request_id: str | None = None) -> int:
    """Reports a failure of the sender itself: one line on stderr, the way every command does
    (:func:`device.cliargs.print_error`: ``fieldnode send: error [code]: message``); with ``--json`` also a JSON
    error object on stdout, shaped like an error reply (what a script reading replies expects), whose code
    (``no_reply``, ``connect_failed``...) is the error class's."""
    from device.cliargs import print_error

    print_error("send", exc, exit_code=code)
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
class Target:
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


def _target(args: argparse.Namespace, *, need_device: bool = True) -> Target:
    """The broker, device and link settings: the flags; without ``--broker``, the board's config fills the rest.

    Raises:
        BadInput: ``--broker`` without ``--device``; no ``--broker`` and no ``link.broker`` in the config.
        ConfigError: The board's config cannot be read or is invalid.
    """
    if args.broker is not None:
        if getattr(args, "device", None) is None and need_device:
            raise BadInput("--device ID is needed with --broker (which board?); on the board itself, leave out "
                           "--broker to use its config")
        return Target(args.broker, getattr(args, "device", None) or "", getattr(args, "prefix", None),
                      args.mqtt or "5", args.ca or "", args.cert or "", args.key or "", args.username,
                      args.password_file, dict(_FLAGS))
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
    return Target(
        broker=link.broker, device=getattr(args, "device", None) or (config.device_id(cfg) if need_device else ""),
        prefix=getattr(args, "prefix", None) or link.prefix or None,
        protocol=args.mqtt or link.protocol, ca=args.ca or link.ca_file, cert=args.cert or link.cert_file,
        key=args.key or link.key_file, username=args.username if args.username is not None else link.username or None,
        password_file=args.password_file or link.password_file or None, names=names)


def _board_key_hint(target: Target, role: str, tls: TlsFiles) -> str:
    """Why a board's own TLS file may be unreadable: it belongs to the agent's user."""
    path = getattr(tls, role, "")
    if target.names.get(role, "").startswith("link.") and os.path.exists(path) and not os.access(path, os.R_OK):
        return "; the board's keys are readable by its service user and root only: run it with sudo"
    return ""


def _credentials(target: Target, url: BrokerUrl) -> tuple[str | None, str | None]:
    user_name, password_name = target.names["username"], target.names["password"]
    if target.password_file and target.username is None:
        raise BadInput(f"{password_name} needs {user_name}")
    if target.username is not None:
        _utf8(user_name, target.username)
    if not target.password_file:
        return target.username, None
    try:
        password = read_password(target.password_file)  # one trailing line ending is not part of it
    except PasswordFileError as exc:
        raise BadInput(f"{password_name} {exc.path}: {exc.problem}") from exc
    if not url.tls:
        print(f"fieldnode send: warning: the password goes unencrypted over {url}; use mqtts://", file=sys.stderr)
    return target.username, password


def _utf8(what: str, value: str) -> None:
    try:
        value.encode("utf-8")  # argv holds undecodable bytes as lone surrogates
    except UnicodeEncodeError as exc:
        raise BadInput(f"{what} {value!r}: not valid UTF-8 ({exc.reason})") from exc
