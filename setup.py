"""Build hook: everything is declared in setup.cfg; this only keeps dev-only modules out of the wheel."""

from setuptools import setup
from setuptools.command.build_py import build_py

# (package, module) pairs that stay in the checkout: tools/make_models.py needs TensorFlow and trains the
# shipped models; a board never runs it.
DEV_ONLY = {("tools", "make_models")}


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if m[:2] not in DEV_ONLY]


setup(cmdclass={"build_py": BuildPy})
