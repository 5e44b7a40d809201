"""``fieldnode install --root``: the real wheel, installed (not editable) into a throwaway root, run from there.

The root is a "host-arch board": its ``/usr`` is this machine's under an overlay that keeps the root's own
changes apart (mounted inside a private mount namespace that dies with each command, so nothing outlives a
command and this machine's ``/usr`` is never written), everything else (``/etc``, ``/opt``, ``/var``) is its
own. ``install --root`` makes the venv and runs pip inside it with ``chroot``, exactly as for an
image; the installed ``fieldnode`` then runs in the root, where ``/opt/fieldnode/venv`` is the path its shebangs
name. systemd's own tools check the unit there. (The arm64 version of this is ``make image-test``.)
These tests need root, as installing into an image does; CI runs as root.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from tests import wheelcheck
from tests.image import pipsettings

CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
# The command line as a board has it, registering `install` for a CLI that does not list it yet.
CLI = ("import sys; from tools import cli; 'install' in cli.COMMANDS or cli._lazy('tools.install.cli', 'install', "
       "'install'); sys.exit(cli.main(sys.argv[1:]))")
# Runs "$@" in a mount namespace of its own where ROOT/usr is an overlay: this machine's /usr below, the root's
# own changes (sysusers.d, tmpfiles.d) in ROOT/../usr-upper. This machine's /usr is never written. The root
# gets a /proc, as a board has (no /sys: the tmpfiles line must not reach this machine's cpufreq files).
IN_ROOT = ('mount -t overlay overlay -o "lowerdir=/usr,upperdir=$0/../usr-upper,workdir=$0/../usr-work" "$0/usr" '
           '&& mount -t proc proc "$0/proc" && exec "$@"')
BOARD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "LANG": "C.UTF-8"}
VENV = "/opt/fieldnode/venv"
SYSTEMD_FILES = {"fieldnode.service": "etc/systemd/system/fieldnode.service",
                 "fieldnode.sysusers": "usr/lib/sysusers.d/fieldnode.conf",
                 "fieldnode.tmpfiles": "usr/lib/tmpfiles.d/fieldnode.conf",
                 "99-fieldnode-edgetpu.rules": "etc/udev/rules.d/99-fieldnode-edgetpu.rules"}


def stored(root: pathlib.Path, board_path: str) -> pathlib.Path:
    """Where a file the install wrote into the root is, seen from outside the namespace (``/usr`` files are in
    the overlay's upper directory)."""
    if board_path.startswith("usr/"):
        return root.parent / "usr-upper" / board_path[len("usr/"):]
    return root / board_path


def in_namespace(root: pathlib.Path, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", IN_ROOT, str(root)]
                          + argv, capture_output=True, text=True, env=env, timeout=300, check=False)


def on_board(root: pathlib.Path, argv: list[str]) -> subprocess.CompletedProcess:
    """A command as the board runs it: inside the root, a clean environment."""
    return in_namespace(root, ["chroot", str(root)] + argv, env=BOARD_ENV)


def install(root: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """``fieldnode install --root ROOT ...`` as a flashing host runs it (this checkout's fieldnode)."""
    return in_namespace(root, [sys.executable, "-c", CLI, "install", "--root", str(root), *args])


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def make_root(path: pathlib.Path) -> pathlib.Path:
    """A root whose /usr will be this machine's (merged-/usr layout, as Debian has), with its own /etc."""
    path.mkdir()
    for d in ("usr", "../usr-upper", "../usr-work"):
        (path / d).mkdir()
    for link in ("bin", "sbin", "lib", "lib64"):
        if os.path.isdir(f"/usr/{link}"):
            os.symlink(f"usr/{link}", path / link)
    for d in ("etc", "root", "var/tmp", "dev", "proc"):
        (path / d).mkdir(parents=True, exist_ok=True)
    (path / "tmp").mkdir(mode=0o1777)
    (path / "tmp").chmod(0o1777)
    for name, minor in (("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)):
        os.mknod(path / "dev" / name, 0o666 | 0o020000, os.makedev(1, minor))
        (path / "dev" / name).chmod(0o666)
    pipsettings.copy_into(str(path))
    return path


def rewrite_wheel(src: str, dest: pathlib.Path, edits: dict) -> str:
    """A copy of the wheel with ``edits[name](bytes) -> bytes`` applied and its RECORD updated to match."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        data = {n: zin.read(n) for n in zin.namelist()}
        for name, edit in edits.items():
            data[name] = edit(data[name])
        record = next(n for n in data if n.endswith(".dist-info/RECORD"))
        lines = []
        for line in data[record].decode().splitlines():
            name = line.split(",")[0]
            if name in edits:
                digest = base64.urlsafe_b64encode(hashlib.sha256(data[name]).digest()).rstrip(b"=").decode()
                line = f"{name},sha256={digest},{len(data[name])}"
            lines.append(line)
        data[record] = ("\n".join(lines) + "\n").encode()
        for name, content in data.items():
            zout.writestr(name, content)
    return str(dest)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("wheel")
    files = wheelcheck.source_files()
    path = wheelcheck.build_wheel(str(work), files)
    wheelcheck.check_contents(path, files)  # the package, its models and the systemd files; no dev-only scripts
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel):
    """A root with the wheel installed by ``fieldnode install --root`` (the first install, with its output)."""
    assert os.geteuid() == 0, "the install tests need root: install --root chroots into the root, as for an image"
    root = make_root(tmp_path_factory.mktemp("board") / "root")
    proc = install(root, "--wheel", wheel)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, proc


def test_install_writes_the_venv_units_and_config(installed, wheel):
    root, proc = installed
    out = proc.stdout
    for board_path in list(SYSTEMD_FILES.values()) + ["etc/fieldnode/fieldnode.toml"]:
        assert f"written   /{board_path} (0644)" in out, out
        st = stored(root, board_path).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, 0, 0), board_path
    for name, board_path in SYSTEMD_FILES.items():  # default prefix: byte for byte the checkout's files
        assert stored(root, board_path).read_bytes() == (CHECKOUT / "systemd" / name).read_bytes(), name
    # The venv sees the distribution's packages, and its scripts name the board's path, not this machine's.
    cfg = (root / VENV.lstrip("/") / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg
    assert (root / VENV.lstrip("/") / "bin/fieldnode").read_text().splitlines()[0] == f"#!{VENV}/bin/python"
    # Installed from the wheel, not editable; the wheel is kept for a re-run on the board.
    direct_url = next((root / VENV.lstrip("/")).glob("lib/python3*/site-packages/fieldnode-*.dist-info/direct_url.json"))
    assert json.loads(direct_url.read_text()).get("dir_info", {}).get("editable") is not True
    assert not list((root / VENV.lstrip("/")).glob("lib/python3*/site-packages/__editable__*"))
    assert [p.name for p in (root / "opt/fieldnode/wheels").glob("*.whl")] == [os.path.basename(wheel)]
    # systemd-sysusers --root made the account in the image, in the groups the unit names.
    passwd = (root / "etc/passwd").read_text()
    assert any(line.startswith("fieldnode:") and line.endswith(":/usr/sbin/nologin") for line in passwd.splitlines())


def test_selftest_runs_from_the_installed_venv(installed):
    root, _ = installed
    where = on_board(root, [f"{VENV}/bin/python", "-c", "import device, tools; print(device.__file__, tools.__file__)"])
    assert where.returncode == 0 and all(p.startswith(f"{VENV}/lib/") for p in where.stdout.split()), where
    proc = on_board(root, [f"{VENV}/bin/fieldnode", "selftest", "--json"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and {v["variant"] for v in report["variants"]} >= {"full", "lite"}, report
    # The written config is the one the installed command reads, and it is the defaults.
    shown = on_board(root, [f"{VENV}/bin/fieldnode", "config", "show"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["source"] == "/etc/fieldnode/fieldnode.toml"


def test_systemd_verifies_and_enables_the_installed_unit(installed):
    root, _ = installed
    verify = in_namespace(root, ["systemd-analyze", "verify", f"--root={root}", "fieldnode.service"])
    assert verify.returncode == 0 and (verify.stdout + verify.stderr).strip() == "", verify.stdout + verify.stderr
    enabled = in_namespace(root, ["systemctl", f"--root={root}", "is-enabled", "fieldnode.service"])
    assert enabled.stdout.strip() == "enabled", enabled.stdout + enabled.stderr
    link = root / "etc/systemd/system/multi-user.target.wants/fieldnode.service"
    assert os.readlink(link) == "/etc/systemd/system/fieldnode.service"


def test_the_fieldnode_command_is_on_the_boards_path(installed):
    root, _ = installed
    # /usr/local/bin/fieldnode is the venv's entry point, so a technician types `fieldnode status`
    on_path = on_board(root, ["/usr/local/bin/fieldnode", "version", "--json"])
    assert on_path.returncode == 0, on_path.stdout + on_path.stderr
    assert json.loads(on_path.stdout)["fieldnode"]


def test_commented_config_documents_every_key_and_loads_as_defaults():
    from device import config
    from tools.install import files as install_files

    text = install_files.commented_config()
    assert config.loads(text, source="t").to_dict() == config.Config().to_dict()
    keys = [k for k, *_ in config.describe()]
    assert sum(line.startswith("#") and " = " in line for line in text.splitlines()) == len(keys)
    # Uncommenting every key gives a valid file of the same defaults: each line is a real TOML assignment.
    uncommented = "\n".join(line[1:] if line.startswith("#") and " = " in line and not line.startswith("# ")
                            else line for line in text.splitlines())
    assert config.loads(uncommented, source="t").to_dict() == config.Config().to_dict()


def test_rerun_on_the_board_keeps_the_config(installed):
    root, _ = installed
    config = root / "etc/fieldnode/fieldnode.toml"
    config.write_text('[device]\nid = "pole-17"\n')
    config.chmod(0o640)
    # On the board itself: the installed command, no --root and no --wheel (it finds its own kept wheel).
    proc = on_board(root, [f"{VENV}/bin/python", "-c", CLI, "install", "--json"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    actions = {f["path"]: f["action"] for f in report["files"]}
    assert actions.pop("/etc/fieldnode/fieldnode.toml") == "kept"
    assert set(actions.values()) == {"unchanged"}, actions
    assert report["venv_action"] == "kept" and report["root"] == "/"
    # Not booted by systemd (a chroot, as an image is built): the account is made, tmpfiles and udev wait for boot.
    assert report["applied"] == ["users"], report
    assert config.read_text() == '[device]\nid = "pole-17"\n' and config.stat().st_mode & 0o777 == 0o640


def test_a_rebuilt_wheel_replaces_the_installed_files(installed, wheel, tmp_path):
    root, _ = installed
    marker = b"\n# rebuilt for the upgrade test\n"
    rebuilt = rewrite_wheel(wheel, tmp_path / os.path.basename(wheel), {"device/__init__.py": lambda b: b + marker})
    proc = install(root, "--wheel", rebuilt)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "venv      /opt/fieldnode/venv (kept" in proc.stdout
    site = next((root / VENV.lstrip("/")).glob("lib/python3*/site-packages"))
    assert (site / "device/__init__.py").read_bytes().endswith(marker)
    kept = root / "opt/fieldnode/wheels" / os.path.basename(wheel)
    assert kept.read_bytes() == pathlib.Path(rebuilt).read_bytes()


def test_a_wheel_pip_refuses_leaves_the_install_as_it_was(installed, wheel, tmp_path):
    root, _ = installed
    site = next((root / VENV.lstrip("/")).glob("lib/python3*/site-packages"))
    before = (site / "device/__init__.py").read_bytes()
    kept_before = sorted((root / "opt/fieldnode/wheels").iterdir())
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    bad = rewrite_wheel(wheel, tmp_path / os.path.basename(wheel),
                        {meta: lambda b: b.replace(b"Requires-Python: >=3.9", b"Requires-Python: >=4")})
    proc = install(root, "--wheel", bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "[install_pip]" in err[0] and "requires a different Python" in err[0], proc.stderr
    assert (site / "device/__init__.py").read_bytes() == before
    assert sorted((root / "opt/fieldnode/wheels").iterdir()) == kept_before


@pytest.mark.parametrize("case, code, words", [
    ("no-root-dir", "install_root", "no such directory"),
    ("no-wheel", "install_wheel", "no such file"),
    ("not-a-wheel", "install_wheel", "not a wheel"),
    ("no-python", "install_python", "not found in the root"),
    ("bad-prefix", "install_usage", "expected an absolute path"),
    ("dotdot-prefix", "install_usage", "without . or .. parts"),
])
def test_bad_input_is_one_clear_line(tmp_path, wheel, case, code, words):
    (tmp_path / "root").mkdir()
    junk = tmp_path / "fieldnode-0.1.0-py3-none-any.whl"
    junk.write_text("not a zip")
    args = {"no-root-dir": ["--root", str(tmp_path / "missing"), "--wheel", wheel],
            "no-wheel": ["--root", str(tmp_path / "root"), "--wheel", str(tmp_path / "missing.whl")],
            "not-a-wheel": ["--root", str(tmp_path / "root"), "--wheel", str(junk)],
            "no-python": ["--root", str(tmp_path / "root"), "--wheel", wheel],
            "bad-prefix": ["--root", str(tmp_path / "root"), "--wheel", wheel, "--prefix", "opt/x"],
            "dotdot-prefix": ["--root", str(tmp_path / "root"), "--wheel", wheel, "--prefix", "/opt/../../escaped"]}[case]
    proc = cli("install", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert f"[{code}]" in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    as_json = cli("install", *args, "--json")
    assert json.loads(as_json.stdout)["error"]["code"] == code
    assert not list((tmp_path / "root").iterdir())  # nothing written into a root it refused


def test_needs_root_says_so(tmp_path, monkeypatch, wheel):
    # Error injection: the effective uid (this test runs as root).
    import argparse

    from tools.install import cli as tool

    monkeypatch.setattr(tool.os, "geteuid", lambda: 1000)
    parser = argparse.ArgumentParser()
    tool.add_arguments(parser)
    with pytest.raises(tool.InstallError, match="needs root.*chroot.*sudo") as err:
        tool.run(parser.parse_args(["--root", str(tmp_path), "--wheel", wheel]))
    assert err.value.code == "install_needs_root"


def test_no_wheel_found_names_where_it_looked(tmp_path, monkeypatch):
    import argparse

    from tools.install import cli as tool

    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/python3").write_text("")
    monkeypatch.setattr(tool.sys, "prefix", str(tmp_path / "nowhere/venv"))
    parser = argparse.ArgumentParser()
    tool.add_arguments(parser)
    args = parser.parse_args(["--root", str(tmp_path), "--prefix", "/opt/elsewhere"])
    target = tool.Target.from_args(args)
    dist = CHECKOUT / "dist"
    if list(dist.glob("fieldnode-*.whl")):  # a `make wheel` in this checkout is a wheel of this version
        assert tool.find_wheel(None, target).startswith(str(dist))
    else:
        with pytest.raises(tool.InstallError, match="no wheel of fieldnode .* found .*make wheel"):
            tool.find_wheel(None, target)


def test_an_absolute_symlink_in_the_image_is_never_written_through(tmp_path):
    """In a mounted image, /etc/systemd/system -> /etc/systemd/system would be this machine's: refused."""
    from tools.install import files

    root = tmp_path / "root"
    host = tmp_path / "host-etc"  # stands for this machine's /etc
    (root / "etc/systemd").mkdir(parents=True)
    host.mkdir()
    os.symlink(str(host), root / "etc/systemd/system")  # absolute: resolves outside the root
    with pytest.raises(files.OutsideRoot, match="outside the image root"):
        files.write_system_files(str(root), "/opt/fieldnode")
    assert not list(host.iterdir())
    with pytest.raises(files.OutsideRoot):
        files.host_path(str(root), "/etc/systemd/system/fieldnode.service")
    assert files.host_path(str(root), "/etc/fieldnode/fieldnode.toml") == str(root / "etc/fieldnode/fieldnode.toml")


@contextlib.contextmanager
def tls_index(tmp_path: pathlib.Path):
    """A package index on 127.0.0.1 whose certificate no one trusts (self-signed): pip's TLS check fails on it."""
    import datetime
    import http.server
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "index.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "index.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tmp_path / "index.pem"), str(tmp_path / "index.key"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="tls-index", daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_pip_failure_says_its_cause_not_only_its_last_error_line(tmp_path):
    """After a TLS verification failure pip's last ERROR line only says that no version was found: the install's
    one-line error must carry the cause (before, it showed that last line alone)."""
    from tools.install.cli import InstallError, Target

    target = Target("/", "/opt/fieldnode", sys.executable)
    with tls_index(tmp_path) as url, pytest.raises(InstallError) as info:
        target.run([sys.executable, "-m", "pip", "download", "--isolated", "--disable-pip-version-check", "--no-input",
                    "--retries", "1", "--no-deps", "--dest", str(tmp_path / "dl"), "--index-url", url,
                    "fieldnode-no-such-package"], "pip install fieldnode-no-such-package", "install_pip")
    message = str(info.value)
    assert info.value.code == "install_pip" and "\n" not in message
    # pip's own words differ between its versions: the cause may be its TLS verification error followed by "No
    # matching distribution found" (pip 24 on Python 3.11), or an exception about the TLS hostname (a newer pip on
    # Python 3.13). Either way the message carries the cause besides the last line.
    parts = message.split("): ", 1)[1].split(" | ")
    assert len(parts) >= 2, message
    assert any(w in message for w in ("CERTIFICATE_VERIFY_FAILED", "SSL", "hostname")), message
