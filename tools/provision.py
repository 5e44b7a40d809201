"""``fieldnode provision --device-id ID [--root DIR] [--force] [--json]``: a board's own identity, made on the board.

1. The device id is checked with the config's rule (``device.id``); the config file is read and validated.
2. Where each file goes: a key already set in the config keeps its path; an unset one is put beside the config
   file (``update.age``, ``client.key``, ``client.pem``) and written into the config. The CSR goes beside the key.
3. Nothing is written until every check passed: keys that exist are refused unless ``--force`` (a re-provisioned
   board gets new keys, and its old certificate and recipient stop working), and the config edit is made in
   memory and proven (parsed again: every other value unchanged, and ``device.config`` loads it).
4. Written, each atomically: the age X25519 identity the board decrypts its updates with (``age-keygen``'s format),
   the TLS client key (EC P-256) and a CSR for the fleet CA (CN = the device id); private files 0600, owned by the
   service user ``fieldnode`` when it exists and we are root (the agent reads them; nobody else but root). Then
   the config, every other line and comment kept.
5. Printed: the device id, the age recipient, the CSR and where each file went (``--json``: one object).

With ``--root DIR`` every path is inside a mounted image (how boards are flashed); the config keeps the board's
own paths. No default credentials exist anywhere. See docs/provisioning.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import grp
import json
import os
import pwd
import re
import sys
from dataclasses import dataclass, field

from device.errors import ConfigError, Exit, FieldnodeError, UsageError

SERVICE_USER = "fieldnode"
IDENTITY_NAME, KEY_NAME, CERT_NAME = "update.age", "client.key", "client.pem"


class ProvisionError(FieldnodeError):
    """Provisioning could not be done: a file cannot be written, the image root is unusable."""

    code = "provision_failed"


class KeysExist(ProvisionError):
    """The board has keys already; only ``--force`` replaces them."""

    code = "keys_exist"


class ConfigNotEditable(ProvisionError):
    """The config file is written in a way this careful edit does not change (dotted keys, inline tables)."""

    code = "config_not_editable"


def device_id_arg(text: str) -> str:
    """An argparse ``type``: a device id by the config's own rule for ``device.id`` (non-empty here)."""
    from device import config

    if not text:
        raise argparse.ArgumentTypeError("expected a device id, got ''")
    try:
        config.from_mapping({"device": {"id": text}}, source="--device-id")
    except ConfigError as exc:
        # The config allows an empty id (derived from the machine id); provisioning names one.
        raise argparse.ArgumentTypeError(exc.message.replace("expected '' or ", "expected ")) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``provision`` options.

    Args:
        p: The parser of the ``provision`` subcommand.
    """
    p.add_argument("--device-id", type=device_id_arg, metavar="ID",
                   help="this board's id: 1-64 characters from A-Z, a-z, 0-9, '_' and '-' (required, but with "
                        "--renew, which keeps the config's device.id)")
    p.add_argument("--root", metavar="DIR",
                   help="provision a mounted image: every path (config, keys, users) is inside DIR")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true",
                      help="replace existing keys with new ones (the old certificate and update recipient stop "
                           "working)")
    mode.add_argument("--renew", action="store_true",
                      help="renew the certificate only: a certificate request from the existing TLS key (the "
                           "existing one when it still matches); the key and the update identity stay")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# -- where the files go -------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What provisioning will write: board paths (as the config names them) and the host paths under the root."""

    root: str
    device_id: str
    config: str
    identity: str
    key: str
    csr: str
    cert: str
    set_keys: dict = field(default_factory=dict)  # dotted key -> value written into the config
    old_id: str = ""
    warnings: list = field(default_factory=list)
    lacks: list = field(default_factory=list)  # (dotted key, what to set) the agent still needs

    def host(self, board_path: str) -> str:
        """Where a board path is on this machine: under the root, resolved no further than the root allows."""
        if self.root == "/":
            return board_path
        return os.path.join(self.root, board_path.lstrip("/"))


def _board_path(value: str, key: str, source: str) -> str:
    if not os.path.isabs(value):  # the agent (cwd /) and this command would not read the same file
        raise ConfigError(f"{value!r} is a relative path; provisioning needs an absolute one", key, source)
    return os.path.normpath(value)


def make_plan(device_id: str, root: str, config_path: str, text: str) -> tuple[Plan, str]:
    """Decides every path and makes the new config text, proven before anything is written.

    Args:
        device_id: The checked device id.
        root: ``/`` on the board, or the image root.
        config_path: The config file as the board names it.
        text: Its current text (empty when it does not exist yet).

    Returns:
        ``(plan, new config text)``.

    Raises:
        ConfigError: The config is not valid now, or a path in it is relative inside an image.
        ConfigNotEditable: The edit cannot be made safely.
    """
    from device import config
    from device.link.url import parse_broker_url

    source = config_path if root == "/" else os.path.join(root, config_path.lstrip("/"))
    cfg = config.loads(text, source=source)  # an invalid config is the technician's first problem
    raw = config.tomllib.loads(text)
    beside = os.path.dirname(config_path)

    def chosen(section: str, name: str, default_name: str) -> tuple[str, bool]:
        value = raw.get(section, {}).get(name, "")  # config.loads has checked the types
        # A value the config sets on purpose is kept; one written out at its default (fieldnode config defaults)
        # is not a choice: the file goes beside the config like the others, never into another directory.
        if value and value != getattr(getattr(config.Config(), section), name):
            return _board_path(value, f"{section}.{name}", source), False
        path = os.path.join(beside, default_name)
        return path, path != value

    identity, identity_unset = chosen("update", "identity_file", IDENTITY_NAME)
    key, key_unset = chosen("link", "key_file", KEY_NAME)
    cert, cert_unset = chosen("link", "cert_file", CERT_NAME)
    plan = Plan(root=root, device_id=device_id, config=config_path, identity=identity, key=key,
                csr=os.path.splitext(key)[0] + ".csr", cert=cert, old_id=cfg.device.id)
    plan.set_keys["device.id"] = device_id
    if identity_unset:
        plan.set_keys["update.identity_file"] = identity
    if cfg.link.broker and not parse_broker_url(cfg.link.broker).tls:
        # TLS files with a plain URL are a config error: the key is made, the config names it later.
        if key_unset or cert_unset:
            plan.warnings.append(f"link.broker is a plain mqtt:// URL: link.key_file and link.cert_file are left "
                                 f"unset; set them ({key}, {cert}) when the board moves to mqtts://")
    else:
        if key_unset:
            plan.set_keys["link.key_file"] = key
        if cert_unset:
            plan.set_keys["link.cert_file"] = cert
    new_text = set_toml_keys(text, plan.set_keys, source=source)
    check = config.loads(new_text, source=source)
    if check.device.id != device_id:  # set_toml_keys proved the data; this is the loader's own view
        raise ConfigNotEditable(f"{source}: device.id reads back as {check.device.id!r}, not {device_id!r}")
    plan.lacks = config_lacks(check, plan.host)
    return plan, new_text


def config_lacks(cfg, host=lambda path: path) -> list[tuple[str, str]]:
    """What the provisioned config still lacks before the board does its job: ``(dotted key, what to do)`` for
    the sensor, the broker and the fleet CA (what this command cannot know).

    Args:
        cfg: The config as provisioned.
        host: Where a board path is on this machine (the image's, with ``--root``).
    """
    from device.link.url import parse_broker_url

    out = []
    if not cfg.drivers.sensor_url and not cfg.drivers.virtual_board:
        out.append(("drivers.sensor_url", "the sensor's serial port (e.g. /dev/ttyAMA0): fieldnode run refuses "
                                          "to start without it"))
    if not cfg.link.broker:
        out.append(("link.broker", "the fleet's broker (e.g. mqtts://broker.example:8883): until then the board "
                                   "publishes nothing"))
        out.append(("link.ca_file", "the fleet CA's certificate, with which the board verifies the broker's"))
    elif parse_broker_url(cfg.link.broker).tls and cfg.link.ca_file and not os.path.exists(host(cfg.link.ca_file)):
        out.append(("link.ca_file", f"install the fleet CA's certificate at {cfg.link.ca_file}: the board "
                                    f"verifies the broker with it, and fieldnode run refuses to start without it"))
    return out


# -- the careful TOML edit ----------------------------------------------------------------------------------------


def set_toml_keys(text: str, values: dict, *, source: str = "<config>") -> str:
    """Sets string keys of top-level tables in TOML text, keeping every other line, comment and blank as it is.

    A key in its ``[table]`` gets its value replaced on its own line (a trailing comment stays); a missing key
    replaces its commented-out line (``#key = default``) or is added after the table's last statement; a missing
    table is appended. The result is parsed again and must
    hold exactly the old data plus the new values, so an edit this cannot make safely (a table written as dotted
    keys or an inline table, a multi-line value) is refused, never half-made.

    Args:
        text: The TOML document ("" for a new file).
        values: Dotted ``table.key`` -> string value.
        source: The file, for messages.

    Returns:
        The new text.

    Raises:
        ConfigNotEditable: The edit cannot be made safely; the message names the key to set by hand.
    """
    from device.config import tomllib

    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += newline
    expected = tomllib.loads(text)
    for dotted, value in values.items():
        table, key = dotted.split(".")
        expected.setdefault(table, {})[key] = value
        by_hand = f"set {dotted} = {_toml_string(value)} in {source} by hand"
        starts = _statement_starts(lines)
        header = next((i for i in starts if _table_of(lines[i]) == table), None)
        if header is None:
            if table in tomllib.loads("".join(lines)):
                raise ConfigNotEditable(f"{source}: {table} is not written as a [{table}] table (dotted keys, an "
                                        f"inline table or a sub-table); {by_hand}")
            lines += ([newline] if lines else []) + [f"[{table}]{newline}", f"{key} = {_toml_string(value)}{newline}"]
            continue
        end = next((i for i in starts if i > header and lines[i].lstrip().startswith("[")), len(lines))
        key_re = re.compile(r"(\s*(?:%s|\"%s\"|'%s')\s*=\s*)(.*?)(\r?\n)?\Z" % ((re.escape(key),) * 3), re.S)
        found = [i for i in starts if header < i < end and key_re.match(lines[i])]
        # A key shown commented out at its default (as fieldnode install writes the config) is set in its place.
        shown = [i for i in starts if header < i < end and re.match(r"\s*#\s*%s\s*=" % re.escape(key), lines[i])]
        if not found and shown:
            lines[shown[0]] = f"{key} = {_toml_string(value)}{newline}"
        elif found:
            m = key_re.match(lines[found[0]])
            rest = _after_value(m.group(2))
            if rest is None:
                raise ConfigNotEditable(f"{source}: {dotted} has a value this edit does not replace; {by_hand}")
            lines[found[0]] = m.group(1) + _toml_string(value) + rest + (m.group(3) or "")
        else:
            last = max((i for i in range(header, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")))
            lines.insert(last + 1, f"{key} = {_toml_string(value)}{newline}")
    new = "".join(lines)
    try:
        ok = tomllib.loads(new) == expected
    except tomllib.TOMLDecodeError:
        ok = False
    if not ok:
        raise ConfigNotEditable(f"{source}: the file is written in a way this edit cannot change safely; set "
                                + ", ".join(f"{k} = {_toml_string(v)}" for k, v in values.items()) + " by hand")
    return new


_HEADER = re.compile(r"\s*\[\s*([A-Za-z0-9_-]+|\"[A-Za-z0-9_-]+\")\s*\]\s*(?:#.*)?\s*\Z", re.S)


def _table_of(line: str) -> str | None:
    m = _HEADER.match(line)
    return m.group(1).strip('"') if m else None


def _toml_string(value: str) -> str:
    # JSON's escapes are TOML basic-string escapes; DEL is the one control character JSON leaves raw.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _after_value(value_and_rest: str) -> str | None:
    """What follows a one-line value (spaces and a comment), or None for a multi-line or unreadable value."""
    s = value_and_rest
    if s.startswith(('"""', "'''")):
        return None
    if s.startswith('"'):
        m = re.match(r'"(?:[^"\\]|\\.)*"', s)
    elif s.startswith("'"):
        m = re.match(r"'[^']*'", s)
    else:
        m = re.match(r"[^#\s\[{]*", s)
    return s[m.end():] if m and m.end() else None


def _statement_starts(lines: list) -> list:
    """Indexes of lines that begin outside any multi-line string or array: where keys and headers can be."""
    starts, ml, depth = [], None, 0
    for n, line in enumerate(lines):
        if ml is None and depth == 0:
            starts.append(n)
        i = 0
        while i < len(line):
            if ml is not None:
                if ml == '"""' and line[i] == "\\":
                    i += 2
                elif line.startswith(ml, i):
                    ml, i = None, i + 3
                else:
                    i += 1
                continue
            c = line[i]
            if c == "#":
                break
            if line.startswith(('"""', "'''"), i):
                ml, i = line[i:i + 3], i + 3
                continue
            if c in "\"'":
                m = re.compile(r'"(?:[^"\\\n]|\\.)*"' if c == '"' else r"'[^'\n]*'").match(line, i)
                i = m.end() if m else len(line)
                continue
            depth += (c == "[") - (c == "]" and depth > 0)
            i += 1
    return starts


# -- the keys -------------------------------------------------------------------------------------------------------


def make_keys(device_id: str) -> dict:
    """The board's new keys, in memory: the age identity file text and recipient, the TLS key and its CSR (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from device.update import age

    identity, recipient = age.generate_identity()
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    identity_text = age.identity_file_text(identity, recipient, created)  # as fieldnode keys writes it
    key = ec.generate_private_key(ec.SECP256R1())
    return {
        "identity": identity_text.encode("ascii"),
        "recipient": recipient,
        "key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()),
        "csr": make_csr(key, device_id),
    }


def make_csr(key, device_id: str) -> bytes:
    """A certificate request (PEM) for the fleet CA: subject ``CN=<device id>``, clientAuth, signed by ``key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def service_owner(root: str) -> tuple[int, int] | None:
    """``(uid, gid)`` of the service user and its group, from the board's (or the image's) user database."""
    if root == "/":
        try:
            uid, gid = pwd.getpwnam(SERVICE_USER).pw_uid, pwd.getpwnam(SERVICE_USER).pw_gid
        except KeyError:
            return None
        try:
            gid = grp.getgrnam(SERVICE_USER).gr_gid
        except KeyError:
            pass
        return uid, gid
    users, groups = _db(os.path.join(root, "etc/passwd")), _db(os.path.join(root, "etc/group"))
    user = users.get(SERVICE_USER)
    if user is None or len(user) < 4 or not user[3].isdigit():
        return None
    return int(user[2]), int(groups[SERVICE_USER][2]) if SERVICE_USER in groups else int(user[3])


def _db(path: str) -> dict:
    """``name -> fields`` of a passwd or group file (the image's own, which this machine's NSS does not read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            rows = [line.rstrip("\n").split(":") for line in fh]
    except OSError:
        return {}
    return {r[0]: r for r in rows if len(r) >= 3 and r[0] and r[2].isdigit()}


# -- the command ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Provisions the board (or the image under ``--root``); errors raise (the CLI prints one line).

    Returns:
        0 when every file is written.

    Raises:
        ConfigError: The config cannot be read or is invalid (exit 2).
        KeysExist: Keys are there and ``--force`` was not given.
        ProvisionError: The root is unusable or a file cannot be written; nothing is left half-made.
    """
    from device import config
    from device.statefile import short_error

    root = os.path.abspath(args.root) if args.root else "/"
    if root != "/" and not os.path.isdir(root):
        raise ProvisionError(f"--root {args.root}: not a directory (mount the image's root file system there)")
    if root == "/":
        config_path, _ = config.resolve_path(getattr(args, "config", None))
        config_path = os.path.abspath(config_path)
    else:  # the host's FIELDNODE_CONFIG names a file of this machine, not of the image
        config_path = getattr(args, "config", None) or config.DEFAULT_PATH
        if not os.path.isabs(config_path):
            raise ProvisionError(f"--config {config_path}: with --root it must be the board's absolute path")
    host_config = config_path if root == "/" else os.path.join(root, config_path.lstrip("/"))
    text = _read_config(host_config)
    if getattr(args, "renew", False):
        from tools.provision_renew import renew

        return renew(args, root, config_path, text, make_plan=make_plan, make_csr=make_csr)
    if not args.device_id:
        raise UsageError("--device-id ID is required (only --renew takes the config's device.id)")
    plan, new_text = make_plan(args.device_id, root, config_path, text)

    private = [("update identity", plan.identity), ("TLS client key", plan.key)]
    for what, path in private + [("certificate request", plan.csr), ("config", plan.config)]:
        _check_inside(plan, plan.host(path), what)
    existing = [path for _, path in private + [("", plan.csr)] if os.path.lexists(plan.host(path))]
    if existing and not args.force:
        raise KeysExist(f"this board has keys already ({', '.join(existing)}); --force makes new ones, and its "
                        f"certificate and the update recipient the operator granted releases to stop working")
    owner = service_owner(root)
    if owner is None:
        where = "on this board" if root == "/" else f"in {root}/etc/passwd"
        plan.warnings.append(f"user {SERVICE_USER} does not exist {where}: the private keys are owned by root, and the "
                             f"agent (user {SERVICE_USER}) cannot read them; once the user exists (fieldnode install "
                             f"makes it, with --root in an image; systemd-sysusers at first boot), run "
                             f"chown {SERVICE_USER}:{SERVICE_USER} {plan.identity} {plan.key}")
    elif os.geteuid() != 0 and owner[0] != os.geteuid():
        plan.warnings.append(f"not root: the private keys stay owned by uid {os.geteuid()}, which the agent (user "
                             f"{SERVICE_USER}) cannot read; run provision as root")
        owner = None
    if existing and os.path.exists(plan.host(plan.cert)):
        plan.warnings.append(f"the certificate at {plan.cert} is for the old key: the agent cannot connect until the "
                             f"certificate for the new request is installed there")
    keys = make_keys(plan.device_id)
    files = [(plan.identity, keys["identity"], 0o600, owner), (plan.key, keys["key"], 0o600, owner),
             (plan.csr, keys["csr"], 0o644, None)]
    try:
        _write_all(plan, files, new_text, host_config, replace=args.force)
    except OSError as exc:
        where = exc.filename or host_config
        raise ProvisionError(f"cannot write {where}: {short_error(exc)}"
                             + ("; some keys may be new already: run it again with --force" if args.force
                                else "; nothing was changed")) from exc
    _report(args, plan, keys, owner, replaced=bool(existing))
    return Exit.OK


def _read_config(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return ""  # a board provisioned before its config exists gets a new one
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", source=path) from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"invalid TOML: not UTF-8 ({exc.reason} at byte {exc.start})", source=path) from exc


def _check_inside(plan: Plan, host_path: str, what: str) -> None:
    """With --root, a path must stay in the image: an absolute symlink there points at this machine's files."""
    if plan.root == "/":
        return
    real, root = os.path.realpath(host_path), os.path.realpath(plan.root)
    if os.path.commonpath([real, root]) != root:
        raise ProvisionError(f"{what} {host_path} resolves to {real}, outside the image root {plan.root} (an "
                             f"absolute symlink in the image?); refusing to write to this machine's files")


def _write_all(plan: Plan, files: list, new_text: str, host_config: str, *, replace: bool) -> None:
    """Writes the keys (new names only, unless ``replace``), then the config; a failure removes what it made."""
    from device.statefile import fsync_dir, write_atomic, write_new

    made: list = []
    try:
        for board_path, data, mode, owner in files:
            path = plan.host(board_path)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            if replace:
                write_atomic(path, data, mode)
            else:
                write_new(path, data, mode)
                made.append(path)
            if owner is not None:
                os.chown(path, *owner)
                fsync_dir(os.path.dirname(path))
        st = os.stat(host_config) if os.path.exists(host_config) else None
        os.makedirs(os.path.dirname(host_config), mode=0o755, exist_ok=True)
        write_atomic(host_config, new_text.encode("utf-8"), st.st_mode & 0o7777 if st else 0o644)
        if st is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()) and os.geteuid() == 0:
            os.chown(host_config, st.st_uid, st.st_gid)  # a config readable by group fieldnode stays so
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def _report(args: argparse.Namespace, plan: Plan, keys: dict, owner, *, replaced: bool) -> None:
    owner_name = SERVICE_USER if owner is not None else None
    doc = {
        "ok": True, "device_id": plan.device_id, "recipient": keys["recipient"], "csr": keys["csr"].decode("ascii"),
        "root": plan.root, "replaced": replaced, "owner": owner_name, "previous_device_id": plan.old_id or None,
        "files": {"config": plan.config, "identity": plan.identity, "key": plan.key, "csr": plan.csr,
                  "certificate": plan.cert},
        "config_keys_set": sorted(plan.set_keys), "warnings": plan.warnings,
        "config_lacks": [key for key, _what in plan.lacks],
    }
    for warning in plan.warnings:
        print(f"fieldnode provision: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(doc))
        return
    mode = f"0600, owner {owner_name}" if owner_name else "0600"
    was = f" (was {plan.old_id})" if plan.old_id and plan.old_id != plan.device_id else ""
    lines = [f"device id: {plan.device_id}{was}"]
    if plan.root != "/":
        lines.append(f"image root: {plan.root} (the paths below are the board's, inside it)")
    if replaced:
        lines.append("new keys replace the old ones: grant releases to the new recipient and install a certificate "
                     "for the new key; the old ones no longer work on this board")
    lines += [
        f"age recipient: {keys['recipient']}",
        f"update identity: {plan.identity} ({mode})",
        f"TLS client key: {plan.key} ({mode})",
        f"certificate request: {plan.csr} (public)",
        f"config: {plan.config} (set {', '.join(sorted(plan.set_keys))})",
        "next:",
    ]
    steps = [f"set {key} in {plan.config}: {what}" for key, what in plan.lacks]
    steps += [f"sign the request with the fleet CA; install the certificate at {plan.cert} (mode 0644)",
              f"on the operator's machine: fieldnode repo grant REPO --device {plan.device_id} --recipient "
              f"{keys['recipient']} --name NAME --version N",
              "sudo systemctl restart fieldnode, then fieldnode diag"]
    lines += [f"  {n}. {step}" for n, step in enumerate(steps, 1)]
    lines.append(keys["csr"].decode("ascii").rstrip("\n"))
    print("\n".join(lines))
