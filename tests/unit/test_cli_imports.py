"""``fieldnode run`` with no link carries no TLS, MQTT or signing code for its whole life: the CLI builds only
the chosen subcommand's options (each tool's module is imported to build them)."""

from __future__ import annotations

import json
import subprocess
import sys


def imported_by(argv: list[str]) -> set[str]:
    code = ("import json, sys\n"
            "from tools import cli\n"
            f"parser = cli.build_parser(only=cli.chosen_command({argv!r}))\n"
            f"parser.parse_args({argv!r})\n"
            "import device.agent.agent, device.agent.daemon\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_run_without_a_link_imports_neither_paho_nor_cryptography_nor_ssl():
    mods = imported_by(["run", "--sim"])
    for heavy in ("paho", "cryptography", "ssl", "tools.keys", "tools.send", "device.update.age"):
        assert heavy not in mods, f"{heavy} is imported by fieldnode run"


def test_the_chosen_command_skips_global_options_and_the_config_value():
    from tools.cli import chosen_command

    assert chosen_command(["--config", "run", "-v", "status"]) == "status"  # a config file named "run"
    assert chosen_command(["-v", "--config=x.toml", "diag", "--json"]) == "diag"
    assert chosen_command(["--help"]) == ""
    assert chosen_command([]) == ""


def test_help_still_lists_every_command_and_each_commands_own_help_works():
    from tools import cli

    out = subprocess.run([sys.executable, "-m", "tools.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert f"    {name}" in out.stdout, name
    out = subprocess.run([sys.executable, "-m", "tools.cli", "keys", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout
