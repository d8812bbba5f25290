"""The deployment's own interceptors, named in the configuration as `module:attribute`.

`server.extra_interceptors` and `upstream.extra_interceptors` list import paths; each names
a class or a factory (called with no arguments) or an instance, and must give a standard
`grpc.aio.ServerInterceptor` (server side) or `grpc.aio.ClientInterceptor` (the upstream
channels). Where they sit in the order is server/chain.py's to say; a wrong path or type
fails start-up with a message naming the setting.
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

import grpc

from aiproxy.core.settings import ConfigError, Settings

T = TypeVar("T")


def load_object(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {path!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{module_name!r} has no {attribute!r} ({path!r})") from None
    return obj


def load_interceptors(path: str, kind: type[T], setting: str) -> list[T]:
    """The interceptors `path` names: an instance of `kind` (or a list of them) as it is,
    else what calling it (a class or a factory) with no arguments gives.

    A list is for client interceptors: grpc.aio files a ClientInterceptor under the FIRST
    of the four call shapes it implements (an if/elif on its type), so one object that
    implements UnaryUnary and UnaryStream intercepts unary calls only; a factory returns
    one object per shape instead (OpenTelemetry's client interceptors do the same)."""
    obj = load_object(path)
    if not isinstance(obj, (kind, list, tuple)):
        if not callable(obj):
            raise ConfigError(f"{setting}: {path!r} is neither a {kind.__qualname__} nor callable")
        obj = obj()
    items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    for item in items:
        if not isinstance(item, kind):
            raise ConfigError(
                f"{setting}: {path!r} gave a {type(item).__qualname__}, not a "
                f"grpc.aio.{kind.__name__}"
            )
    return items


def server_interceptors(paths: list[str]) -> list[grpc.aio.ServerInterceptor]:
    kind: Any = grpc.aio.ServerInterceptor  # abstract: mypy refuses it as a type[T]
    return [i for p in paths for i in load_interceptors(p, kind, "server.extra_interceptors")]


def client_interceptors(paths: list[str]) -> list[grpc.aio.ClientInterceptor]:
    kind: Any = grpc.aio.ClientInterceptor
    return [i for p in paths for i in load_interceptors(p, kind, "upstream.extra_interceptors")]


def check_settings(settings: Settings) -> None:
    """Fail early, with the setting's name, on what only start-up would find: the extra
    interceptors (imported and built once here) and the Consul targets' grammar."""
    from aiproxy.server.pool.consul import ConsulTarget, is_consul
    from aiproxy.server.pool.srv import SrvTarget, is_srv

    server_interceptors(settings.server.extra_interceptors)
    client_interceptors(settings.upstream.extra_interceptors)
    for entry in settings.upstream.endpoints:
        if is_consul(entry):
            try:
                ConsulTarget.parse(entry)
            except ValueError as exc:
                raise ConfigError(f"upstream.endpoints: {exc}") from None
        if is_srv(entry):
            try:
                SrvTarget.parse(entry)
            except ValueError as exc:
                raise ConfigError(f"upstream.endpoints: {exc}") from None
