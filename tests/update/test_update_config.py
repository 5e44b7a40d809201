"""The [update] section: off by default, both ends or neither, and loading it never imports the update path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from device import config
from device.errors import ConfigError


def test_updates_are_off_by_default():
    assert config.Config().update.root_file == "" and config.Config().update.repository == ""


@pytest.mark.parametrize("toml, key", [
    ('root_file = "/etc/fieldnode/root.json"', "update.repository"),
    ('repository = "https://updates.example/fleet/"', "update.root_file"),
    ('root_file = "/r"\nrepository = "/media/usb/repo"\nhwclass = "rpi 4"', "update.hwclass"),
    ('root_file = "/r"\nrepository = "/media/usb/repo"\nring = ""', "update.ring"),
])
def test_refused_naming_the_key(toml, key):
    with pytest.raises(ConfigError) as err:
        config.loads("[update]\n" + toml + "\n")
    assert err.value.key_path == key


def test_loading_the_config_imports_no_update_machinery():
    code = "import sys, device.config as c; c.Config(); print(sorted(m for m in sys.modules if m.startswith(('tuf', " \
           "'securesystemslib', 'urllib3', 'device.update.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['device.update.config']"
