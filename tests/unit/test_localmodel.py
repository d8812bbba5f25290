"""`aiproxy model-server`'s own logic, without the model: the lock-free /v1/models answer,
--listen parsing, and what it says when the model is not installed."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from typing import Any

import pytest

from aiproxy.server.process import localmodel


async def _call(app: Any, method: str, path: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path}, receive, send)
    return sent


async def test_models_is_answered_without_the_model_app() -> None:
    inner_calls: list[str] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        inner_calls.append(scope["path"])  # stands for llama-cpp-python's app (its lock)

    app = localmodel._models_without_the_lock(inner, "smollm2")
    for path in ("/v1/models", "/v1/models/"):
        start, body = await _call(app, "GET", path)
        assert start["status"] == 200
        assert json.loads(body["body"])["data"][0]["id"] == "smollm2"
    await _call(app, "POST", "/v1/chat/completions")
    await _call(app, "POST", "/v1/models")
    assert inner_calls == ["/v1/chat/completions", "/v1/models"]


def test_listen_is_host_and_port() -> None:
    assert localmodel._split("127.0.0.1:0") == ("127.0.0.1", 0)
    assert localmodel._split("[::1]:8081") == ("::1", 8081)
    for bad in ("8081", "127.0.0.1:", ":80", "host:port"):
        with pytest.raises(ValueError):
            localmodel._split(bad)


def test_a_missing_model_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(localmodel.ModelNotInstalled, match="make model"):
        localmodel.model_path()
    assert localmodel.installed() is False
    parser = argparse.ArgumentParser()
    localmodel.add_arguments(parser)
    assert localmodel.main(parser.parse_args([])) == 2
    assert "make model" in capsys.readouterr().err
