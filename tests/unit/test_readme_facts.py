"""Figures the README repeats from a source of truth are checked against it, so they cannot drift: the
shipped model's manifest (the JSON block and the variants table) and its files' sizes."""

from __future__ import annotations

import json
import os
import re

from device.runtime.manifest import bundled_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def manifest() -> dict:
    with open(os.path.join(bundled_model_dir(), "model.json"), encoding="utf-8") as f:
        return json.load(f)


def test_the_manifest_block_is_the_shipped_manifest():
    block = re.search(r"```json\n(\{\"name\": \"vibration\".*?)```", readme(), re.S)
    assert block, "the README's model.json example is gone"
    shown, real = json.loads(block.group(1)), manifest()
    for key, value in shown.items():
        assert real[key] == value, key


def test_the_variants_table_matches_the_manifest_and_the_files():
    real = manifest()
    rows = re.findall(r"^\| `(\w+)` \| ([\d,]+) B \| ([\d.]+) \|.*?manifest cost ([\d.]+)|^\| `(\w+)` \| ([\d,]+) B "
                      r"\| ([\d.]+) \|", readme(), re.M)
    seen = {}
    for r in rows:
        name, size, acc, cost = (r[0], r[1], r[2], r[3]) if r[0] else (r[4], r[5], r[6], None)
        seen[name] = (int(size.replace(",", "")), float(acc), cost)
    assert set(seen) == set(real["variants"])
    for name, (size, acc, cost) in seen.items():
        v = real["variants"][name]
        assert size == os.path.getsize(os.path.join(bundled_model_dir(), v["file"])), name
        assert round(v["accuracy"], 3) == acc, name
        if cost is not None:
            assert float(cost) == v["cost"], name


def test_the_core_dependencies_the_readme_names_are_setup_cfgs():
    """The README's count and list of core dependencies is setup.cfg's install_requires, less the interpreter
    (named apart) and the tomli backport of Python < 3.11."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = [ln.split("#")[0].strip() for ln in cfg["options"]["install_requires"].splitlines()]
    names = {re.split(r"[<>=;\s\[]", ln, maxsplit=1)[0].lower() for ln in lines if ln}
    core = names - {"ai-edge-litert", "tomli"}
    said = re.search(r"with (\w+) core dependencies \(([^)]*)\)", readme().replace("\n", " "))
    assert said, "the README no longer says how many core dependencies there are"
    words = {"four": 4, "five": 5, "six": 6, "seven": 7}
    listed = {n.strip().lower().replace("python-tuf", "tuf") for n in said.group(2).split(",")}
    assert words[said.group(1)] == len(core) and listed == core, (said.group(0), sorted(core))
