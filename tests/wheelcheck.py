"""Checks what a board gets: the real wheel, installed non-editable into a fresh venv outside the checkout.

``make test`` runs this before the test suite (``make wheel-check`` runs it alone). It

1. copies the files git tracks (and new files it does not ignore) into a temporary directory, so nothing
   left in the checkout (an old ``build/``, an editable install's metadata) can leak into the wheel;
2. builds the wheel there and checks its contents: every package of ``device``, ``drivers``, ``power`` and
   ``tools`` has its modules, the bundled model ships, the systemd files ship as package data
   (``device/data/systemd/``, byte for byte the checkout's ``systemd/``), and dev-only files
   (``tools/make_models.py``) and the tests do not;
3. installs it (not editable) into a new venv and, from a neutral directory with no config file and an empty
   state directory, runs ``fieldnode --help``, ``fieldnode version --json`` and ``fieldnode selftest --json``
   and checks that each imports the installed copy and succeeds.

Exit status 0 when every check passes; otherwise the failing step is printed and the status is 1.
``--out DIR`` also keeps the checked wheel there (``make wheel`` puts it in ``dist/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("device", "drivers", "power", "tools")
MUST_SHIP = ("device/runtime/__init__.py", "device/runtime/worker.py", "device/link/client.py",
             "device/models/vibration/model.json", "device/models/vibration/vibration_full.tflite",
             "drivers/sim/board.py", "power/governor.py", "tools/bench.py", "tools/install/cli.py")
# systemd/NAME ships as device/data/systemd/NAME: `fieldnode install` writes them onto the board.
SYSTEMD_FILES = ("fieldnode.service", "fieldnode.sysusers", "fieldnode.tmpfiles", "99-fieldnode-edgetpu.rules")
SYSTEMD_DATA = "device/data/systemd/"
DEV_ONLY = ("tools/make_models.py",)


class CheckFailed(Exception):
    pass


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def source_files() -> list[str]:
    """The checkout's files as git sees them: tracked, plus untracked ones it does not ignore."""
    out = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


def expected_modules(files: list[str]) -> set[str]:
    """Every ``.py`` of the shipped packages that the wheel must carry."""
    return {p for p in files if p.endswith(".py") and p.split("/", 1)[0] in PACKAGES and p not in DEV_ONLY}


def build_wheel(work: str, files: list[str]) -> str:
    src = os.path.join(work, "src")
    for rel in files:
        dest = os.path.join(src, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dest)
    dist = os.path.join(work, "dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-w", dist, src])
    wheels = [f for f in os.listdir(dist) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise CheckFailed(f"expected one wheel, got {wheels}")
    return os.path.join(dist, wheels[0])


def check_contents(wheel: str, files: list[str]) -> None:
    zf = zipfile.ZipFile(wheel)
    names = set(zf.namelist())
    systemd = {SYSTEMD_DATA + name for name in SYSTEMD_FILES}
    missing = sorted((expected_modules(files) | set(MUST_SHIP) | systemd) - names)
    if missing:
        raise CheckFailed(f"the wheel lacks {len(missing)} file(s), e.g. {missing[:5]} (a folder without "
                          f"__init__.py is left out by packages = find:)")
    leaked = sorted(n for n in names if n in DEV_ONLY or n.startswith("tests/"))
    if leaked:
        raise CheckFailed(f"dev-only files in the wheel: {leaked}")
    for name in SYSTEMD_FILES:
        with open(os.path.join(ROOT, "systemd", name), "rb") as f:
            if zf.read(SYSTEMD_DATA + name) != f.read():
                raise CheckFailed(f"the wheel's {SYSTEMD_DATA}{name} differs from systemd/{name}")


def check_install(work: str, wheel: str) -> dict:
    venv = os.path.join(work, "venv")
    _run([sys.executable, "-m", "venv", venv])
    py = os.path.join(venv, "bin", "python")
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel])
    neutral = os.path.join(work, "neutral")
    state = os.path.join(neutral, "state")
    os.makedirs(state)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FIELDNODE_"))}
    env["FIELDNODE_CONFIG"] = os.path.join(neutral, "fieldnode.toml")
    with open(env["FIELDNODE_CONFIG"], "w", encoding="utf-8") as f:  # only an empty state dir of our own
        f.write(f'[device]\nstate_dir = "{state}"\n')
    exe = os.path.join(venv, "bin", "fieldnode")
    where = _run([py, "-c", "import device, tools; print(device.__file__); print(tools.__file__)"],
                 cwd=neutral, env=env).stdout.split()
    if not all(p.startswith(venv) for p in where):
        raise CheckFailed(f"the installed command imports from outside its venv: {where}")
    if "usage: fieldnode" not in _run([exe, "--help"], cwd=neutral, env=env).stdout:
        raise CheckFailed("fieldnode --help printed no usage")
    version = json.loads(_run([exe, "version", "--json"], cwd=neutral, env=env).stdout)
    if not version.get("backend"):
        raise CheckFailed(f"fieldnode version found no interpreter backend: {version}")
    selftest = json.loads(_run([exe, "selftest", "--json"], cwd=neutral, env=env).stdout)
    if not selftest.get("ok") or not selftest.get("variants"):
        raise CheckFailed(f"fieldnode selftest failed in the installed wheel: {selftest}")
    return {"version": version, "selftest_ok": selftest["ok"],
            "variants": [v["variant"] for v in selftest["variants"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the wheel and check it as a board installs it")
    parser.add_argument("--out", metavar="DIR", help="keep the checked wheel in DIR")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="fieldnode-wheel-")
    try:
        files = source_files()
        wheel = build_wheel(work, files)
        check_contents(wheel, files)
        report = check_install(work, wheel)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            shutil.copy2(wheel, args.out)
    except CheckFailed as exc:
        print(f"wheel check FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wheel check: {os.path.basename(wheel)} installs outside the checkout; --help, version "
          f"({report['version']['backend']} {report['version'].get('backend_version')}) and selftest "
          f"({', '.join(report['variants'])}) pass" + (f"; kept in {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
