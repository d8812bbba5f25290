"""The configuration reference is generated from the settings model, and stays in step.

core/settings.py is the one source: every section has a docstring and every key a
`Field(description=...)`; scripts/gen_config_docs.py writes config.example.yaml and the
reference part of docs/configuration.md from them. These tests fail when a setting was
added or changed and `make docs` was not run (CI then proves the committed files are what
the model says), and when a key has no description to generate from.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

import pytest
from pydantic import BaseModel

from aiproxy.core.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", ROOT / "scripts" / "gen_config_docs.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for info in model.model_fields.values():
        candidates = [info.annotation, *getattr(info.annotation, "__args__", ())]
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel) and c not in found:
                found += _models(c)
    return found


def test_every_key_and_section_is_described() -> None:
    # A top-level section is described by its class's docstring.
    missing = [
        f"{model.__name__}.{name}"
        for model in _models(Settings)[1:]
        for name, info in model.model_fields.items()
        if not (info.description or "").strip()
    ]
    undocumented = [m.__name__ for m in _models(Settings) if not (m.__doc__ or "").strip()]
    assert not missing, f"add Field(description=...) in core/settings.py: {missing}"
    assert not undocumented, f"add a docstring in core/settings.py: {undocumented}"


def test_committed_files_are_what_the_settings_model_says(gen: ModuleType) -> None:
    stale = [str(p.relative_to(ROOT)) for p in gen.stale()]
    assert not stale, f"{stale} out of step with core/settings.py: run `make docs`"


def test_reference_names_every_key_with_its_environment_variable(gen: ModuleType) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert set(Settings.model_fields) == {name for name, _, _ in gen._sections()}
    for name, model, _ in gen._sections():
        for key in gen.keys((name,), model, model().model_dump(mode="json")):
            assert f"| `{key.dotted}` |" in text, key.dotted
            assert f"`{key.env}`" in text, key.env


def test_a_stale_example_is_caught(gen: ModuleType, tmp_path: pathlib.Path, monkeypatch) -> None:
    example = tmp_path / "config.example.yaml"
    example.write_text(gen.render_yaml().replace("burst: 100", "burst: 101"))
    monkeypatch.setattr(gen, "EXAMPLE", example)
    assert example in gen.stale()
