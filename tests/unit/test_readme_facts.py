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
        assert round(real["accuracy"][name], 3) == acc, name
        if cost is not None:
            assert float(cost) == v["cost"], name
