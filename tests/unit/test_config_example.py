"""config.example.yaml documents every key with its default, and stays in step."""

from __future__ import annotations

import pathlib

import yaml

from aiproxy.core.settings import load_settings

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "config.example.yaml"


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict) and value and not path.endswith(("overrides", "per_method")):
            out |= _keys(value, path + ".")
    return out


def test_example_names_every_key_and_its_default() -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    defaults = load_settings().model_dump(mode="json")
    assert _keys(example) == _keys(defaults)
    assert load_settings(EXAMPLE).model_dump(mode="json") == defaults
