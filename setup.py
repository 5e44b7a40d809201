"""Build hook: everything is declared in setup.cfg; this keeps dev-only modules out of the wheel and puts the
systemd files in it.

``systemd/`` stays a top-level folder of the checkout (its tests and docs name it there); the wheel carries a
copy as package data in ``device/data/systemd/``, where ``fieldnode install`` reads it on a board.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

# (package, module) pairs that stay in the checkout: tools/make_models.py needs TensorFlow and trains the
# shipped models; a board never runs it.
DEV_ONLY = {("tools", "make_models")}
SYSTEMD_FILES = ("fieldnode.service", "fieldnode.sysusers", "fieldnode.tmpfiles", "99-fieldnode-edgetpu.rules")
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if m[:2] not in DEV_ONLY]

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "device", "data", "systemd")
        os.makedirs(dest, exist_ok=True)
        for name in SYSTEMD_FILES:  # a missing one fails the build: a wheel without its unit is no board's
            shutil.copyfile(os.path.join(HERE, "systemd", name), os.path.join(dest, name))


setup(cmdclass={"build_py": BuildPy})
