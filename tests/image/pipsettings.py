"""Gives a board root this machine's pip settings, so pip run inside it (``chroot``) reaches the same package
index the same way: the pip config files, the files they name (CA bundle, constraints) and the resolver file.

``PIP_*`` variables need nothing: a ``chroot`` keeps the environment. Only files are copied (a directory such
as a local ``find-links`` stays outside; pip inside warns and goes on). Used by the install test's root and
the arm64 image test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

# Variables naming a CA bundle that pip (or the requests it vendors) reads.
CA_VARIABLES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
DEFAULT_CA = "/etc/ssl/certs/ca-certificates.crt"


def settings_files(python: str = sys.executable) -> list[str]:
    """The pip config files in force here (global and user, not a venv's own) and the files they or the
    ``PIP_*`` variables name."""
    proc = subprocess.run([python, "-m", "pip", "config", "debug"], capture_output=True, text=True, check=False)
    found, section = [], None
    for line in proc.stdout.splitlines():
        if re.match(r"^\S+:$", line):
            section = line[:-1]
            continue
        m = re.match(r"^\s+(/\S+), exists: True$", line)
        if m and section in ("global", "user", "env"):
            found.append(m.group(1))
            continue
        m = re.match(r"^\s+\S+?[:=]\s*'?(/[^'\s]+)'?$", line)  # a value, or a PIP_X='...' variable
        if m and section in ("global", "user", "env", "env_var") and os.path.isfile(m.group(1)):
            found.append(m.group(1))
    found += [os.environ[v] for v in CA_VARIABLES if os.path.isfile(os.environ.get(v, ""))]
    if os.path.isfile(DEFAULT_CA):
        found.append(DEFAULT_CA)
    return sorted(set(found))


def copy_into(root: str, python: str = sys.executable) -> list[str]:
    """Copies the pip settings and ``/etc/resolv.conf`` to the same paths under ``root``.

    Returns:
        The paths copied (as this machine names them).
    """
    copied = []
    for path in settings_files(python) + ["/etc/resolv.conf"]:
        if not os.path.isfile(path):
            continue
        dest = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.lexists(dest):
            os.unlink(dest)  # a symlink (resolv.conf to /run/...) must not be written through
        shutil.copyfile(path, dest)
        copied.append(path)
    return copied
