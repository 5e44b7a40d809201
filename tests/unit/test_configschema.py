"""The one typed-value checker (device.configschema.ValueSpec) that config keys and command arguments share."""

from __future__ import annotations

import math

import pytest

from device import config
from device.configschema import ValueSpec, show, spec_of


@pytest.mark.parametrize("types, value, normal", [
    (int, 3, 3), (int, True, None), (int, 3.0, None), (int, "3", None),
    (float, 3, 3.0), (float, 2.5, 2.5), (float, False, None), (float, math.nan, None), (float, math.inf, None),
    (float, 10 ** 400, None),  # a JSON integer too large for a float
    (bool, True, True), (bool, 1, None), (bool, 0, None),
    (str, "x", "x"), (str, 1, None), (dict, {"a": 1}, {"a": 1}), (dict, [1], None), (list, [1], [1]),
    (list, {"a": 1}, None), ((int, float), 3, 3), ((int, str), 1.5, None), ((bool, int), True, True),
    ((bool, int), 1, 1), (str, None, None), (int, None, None),
], ids=lambda v: repr(v)[:20])
def test_normalize_types(types, value, normal):
    got = ValueSpec(types).normalize(value)
    assert got == normal and type(got) is type(normal)


def test_an_int_becomes_a_float_only_where_only_a_number_is_accepted():
    assert type(ValueSpec(float).normalize(2)) is float
    assert type(ValueSpec((int, float)).normalize(2)) is int
    assert type(ValueSpec((float, str)).normalize(2)) is float


@pytest.mark.parametrize("spec, value, problem", [
    (ValueSpec(int, minimum=1, maximum=64), 0, "expected an integer from 1 to 64, got 0"),
    (ValueSpec(int, minimum=1, maximum=64), True, "expected an integer from 1 to 64, got true (boolean)"),
    (ValueSpec(int, minimum=1, maximum=64), 4.0, "expected an integer from 1 to 64, got 4.0 (number)"),
    (ValueSpec(float, minimum=0), -0.5, "expected a number >= 0, got -0.5"),
    (ValueSpec(float, maximum=2.5), "x", "expected a number <= 2.5, got 'x' (string)"),
    (ValueSpec(bool), 1, "expected a boolean, got 1 (integer)"),
    (ValueSpec(str, choices=("full", "lite")), "turbo", "expected one of 'full', 'lite', got 'turbo'"),
    (ValueSpec(str, choices=("", "rpi4")), "x", "expected one of '', 'rpi4', got 'x'"),
    (ValueSpec(str, pattern=r"(usb|pci)(:[0-9]+)?", expect="usb or pci", allow_empty=True), "tpu",
     "expected '' or usb or pci, got 'tpu'"),
    (ValueSpec(str, pattern=r"\S+", expect="a word"), "", "expected a word, got ''"),
    (ValueSpec(list), {"a": 1}, "expected an array, got an object"),
    (ValueSpec(dict), [1], "expected an object, got an array"),
    (ValueSpec((int, str)), 1.5, "expected an integer or a string, got 1.5 (number)"),
    (ValueSpec(str), None, "expected a string, got null"),
    (ValueSpec(float), math.inf, "expected a number, got inf (number)"),
])
def test_problem_messages(spec, value, problem):
    assert spec.problem(value) == problem


@pytest.mark.parametrize("spec, value", [
    (ValueSpec(int, minimum=1, maximum=64), 64), (ValueSpec(float, minimum=0, maximum=1), 1),
    (ValueSpec(str, pattern=r"(usb|pci)(:[0-9]+)?", expect="usb or pci", allow_empty=True), ""),
    (ValueSpec(str, pattern=r"(usb|pci)(:[0-9]+)?", expect="usb or pci"), "usb:1"),
    (ValueSpec(str, choices=("", "rpi4")), ""), (ValueSpec((int, str), minimum=1), "text"),
])
def test_valid_values_have_no_problem(spec, value):
    assert spec.problem(value) is None


def test_choices_never_mix_booleans_and_numbers():
    spec = ValueSpec((bool, int), choices=(1, 2))
    assert spec.problem(True) is not None and spec.problem(1) is None
    spec = ValueSpec((bool, int), choices=(True,))
    assert spec.problem(1) is not None and spec.problem(True) is None


@pytest.mark.parametrize("kw, message", [
    ({"types": bytes}, "type must be"), ({"types": ()}, "type must be"), ({"types": (int, set)}, "type must be"),
    ({"types": "int"}, "type must be"), ({"types": str, "minimum": 0}, "minimum/maximum need"),
    ({"types": int, "pattern": "x", "expect": "x"}, "pattern needs the str type"),
    ({"types": str, "pattern": "x"}, "'expect'"), ({"types": str, "pattern": "(", "expect": "x"}, r"pattern '\('"),
    ({"types": str, "choices": ("a", 1)}, "choice or default 1 is not a string"),
    ({"types": int, "default": 0, "minimum": 1}, "default 0 is not an integer >= 1"),
    ({"types": str, "choices": ("a",), "default": "b"}, "default 'b' is not one of 'a'"),
])
def test_definitions_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        ValueSpec(**kw)


@pytest.mark.parametrize("value, typed, text", [
    (None, True, "null"), ({"a": 1}, True, "an object"), ([1], True, "an array"), ((1,), False, "an array"),
    (True, True, "true (boolean)"), (False, False, "false"), (3, True, "3 (integer)"), (2.0, True, "2.0 (number)"),
    ("it's", True, '"it\'s" (string)'), ("x" * 100, False, "'" + "x" * 56 + "..."),
])
def test_show(value, typed, text):
    assert show(value, typed=typed) == text


def test_show_survives_an_integer_past_the_digit_limit():
    assert "integer" in show(10 ** 5000)


def test_every_config_default_passes_its_own_spec():
    # spec_of checks the default against the declaration: a schema typo fails here, not on a board.
    for path, tp, f in config._walk(config.Config):
        spec = spec_of(tp, f.metadata, f.default)
        assert spec.problem(f.default) is None, path
