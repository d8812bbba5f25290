"""The agent's gRPC server: AgentService, grpc.health.v1 and reflection on one port.

    server = AgentServer(AgentSettings(listen="127.0.0.1:0"))
    port = await server.start()
    ...
    await server.stop(grace=5)

grpc.aio only: every handler is a coroutine on the event loop, no thread pool.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from aiproxy.agent.interceptor import SERVICE_NAME, CallInterceptor, MetadataRecorder
from aiproxy.agent.logs import log_event
from aiproxy.agent.model_service import ModelAgentServicer
from aiproxy.agent.openai_backend import HealthMonitor, ModelClient, ModelSettings
from aiproxy.agent.rag import Corpus
from aiproxy.agent.service import AgentServicer
from aiproxy.agent.sessions import Bounds, Conversations, PrefixCache, build_store
from aiproxy.agent.settings import AgentSettings, safe_url
from aiproxy.agent.tools import build_tools
from aiproxy.agent.tracing import server_interceptors as tracing_interceptors
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc

__all__ = ["LIVENESS_SERVICE", "SERVICE_NAME", "AgentServer", "AgentSettings"]

log = logging.getLogger("agent.server")

_HEALTH_SERVICES = ("", SERVICE_NAME)  # the server as a whole, and the API
# SERVING while the process runs, for liveness probes: "" and the API also follow the model
# server (backend openai), and restarting the agent would not bring its model server back.
LIVENESS_SERVICE = "liveness"


class AgentServer:
    def __init__(
        self,
        settings: AgentSettings | None = None,
        *,
        tracer_provider: Any | None = None,
        record_metadata: str | None = None,
    ) -> None:
        self.settings = settings or AgentSettings()
        # TEST ONLY: a file that receives every call's metadata (agent.interceptor.MetadataRecorder).
        self.record_metadata = record_metadata
        self._recorder: MetadataRecorder | None = None
        # An OpenTelemetry TracerProvider: each call gets a SERVER span (see agent.tracing).
        self.tracer_provider = tracer_provider
        self.health = health_aio.HealthServicer()
        corpus = Corpus.bundled()
        s = self.settings
        # The store connects on first use: an agent starts whether Redis is up or not.
        self.conversations = Conversations(
            build_store(
                s.sessions,
                Bounds(
                    max_sessions=s.max_sessions,
                    max_messages=s.max_session_messages,
                    max_chars=s.max_message_chars,
                    ttl_s=s.session_ttl_s,
                    max_sessions_per_owner=s.max_sessions_per_owner,
                ),
                redis_url=s.redis_url,
                timeout_s=s.session_store_timeout_s,
            ),
            PrefixCache(s.prefix_cache_tokens),
        )
        parts = (self.settings, corpus, self.conversations, build_tools(corpus))
        # backend openai: one pooled HTTP client for the process, made here and closed in
        # stop(); a monitor probes the model server and drives health.
        self.model: ModelClient | None = None
        self._monitor: HealthMonitor | None = None
        if self.settings.backend == "openai":
            assert self.settings.base_url is not None  # AgentSettings checked it
            self.model = ModelClient(
                ModelSettings(
                    base_url=self.settings.base_url,
                    api_key=self.settings.api_key,
                    model=self.settings.model,
                    timeout_s=self.settings.model_timeout_s,
                    max_connections=self.settings.model_max_connections,
                    probe_timeout_s=min(2.0, self.settings.health_interval_s),
                )
            )
            self._monitor = HealthMonitor(
                self.model, self.settings.health_interval_s, self._model_reachable
            )
            self.servicer: AgentServicer = ModelAgentServicer(*parts, client=self.model)
        else:
            self.servicer = AgentServicer(*parts)
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None
        self._serving: bool | None = None
        # Health is SERVING when both say so: the operator (set_serving, SIGUSR1/2) and,
        # with a model backend, the last probe of the model server.
        self._admin_serving = True
        self._model_ok = True
        self._stopping = False

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the agent server has not started")
        return self._port

    @property
    def address(self) -> str:
        """HOST:PORT actually bound (the listen address with port 0 resolved)."""
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Bind, start serving, report SERVING; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the agent server is already started")
        settings = self.settings
        if self.record_metadata:
            self._recorder = MetadataRecorder(self.record_metadata)
        calls = CallInterceptor(enable_faults=settings.enable_faults, recorder=self._recorder)
        interceptors: list[grpc.aio.ServerInterceptor] = [calls]
        if self.tracer_provider is not None:
            # Outermost, so the span covers fault injection and the call log too.
            interceptors[:0] = tracing_interceptors(self.tracer_provider)
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
                ("grpc.server.max_pending_requests", settings.max_pending_requests),
                ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_requests * 2),
                # A proxy keeps long-lived connections with keepalive pings; do not answer
                # them with GOAWAY "too_many_pings".
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ],
        )
        pb_grpc.add_AgentServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["AgentService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            credentials = _server_credentials(settings)
            if credentials is None:
                port = server.add_insecure_port(settings.listen)
            else:
                port = server.add_secure_port(settings.listen, credentials)
        except (RuntimeError, OSError) as exc:
            raise RuntimeError(f"cannot listen on {settings.listen}: {exc}") from exc
        self._server, self._port = server, port
        calls.replica = settings.replica_name or self.address
        await server.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self._monitor is not None:
            # The first probe before the first health answer (bounded by its timeout).
            self._model_ok = await self._monitor.check()
            self._monitor.start()
        await self.set_serving(True)
        log_event(
            log,
            "agent_started",
            address=self.address,
            backend=settings.backend,
            base_url=safe_url(settings.base_url) if settings.base_url else None,
            api_key_set=bool(settings.api_key),
            model=settings.model,
            enable_faults=settings.enable_faults,
            recording_metadata=self._recorder is not None,
            first_token_delay_ms=settings.first_token_delay_ms,
            token_delay_ms=settings.token_delay_ms,
            sessions=settings.sessions,
            redis_url=safe_url(settings.redis_url) if settings.redis_url else None,
            prefill_ms_per_token=settings.prefill_ms_per_token,
            replica=calls.replica,
        )
        return port

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for "" and the API (Watch streams see it at once).

        With a model backend, SERVING also needs the model server to be reachable.
        """
        self._admin_serving = serving
        await self._publish()

    async def _model_reachable(self, ok: bool) -> None:
        self._model_ok = ok
        if self._server is not None and self._serving is not None:
            await self._publish()

    async def _publish(self) -> None:
        if self._server is None or self._stopping:
            return
        serving = self._admin_serving and self._model_ok
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in _HEALTH_SERVICES:
            await self.health.set(service, status)
        if serving != self._serving:
            self._serving = serving
            log_event(
                log,
                "health_changed",
                status=health_pb2.HealthCheckResponse.ServingStatus.Name(status),
            )

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING for good, refuse new calls, give in-flight calls `grace` seconds.

        As with grpc.aio.Server.stop, `grace=None` cancels in-flight calls at once.
        """
        if self._server is None:
            return
        self._stopping = True
        if self._monitor is not None:
            await self._monitor.stop()
        await self.health.enter_graceful_shutdown()
        if self._serving:
            self._serving = False
            log_event(log, "health_changed", status="NOT_SERVING")
        log_event(log, "agent_stopping", grace_s=grace)
        await self._server.stop(grace)
        if self.model is not None:
            await self.model.aclose()  # after the calls that use it have ended
        await self.conversations.store.aclose()
        if self._recorder is not None:
            self._recorder.close()
        if self.tracer_provider is not None and hasattr(self.tracer_provider, "shutdown"):
            self.tracer_provider.shutdown()  # flush spans not exported yet
        log_event(log, "agent_stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _server_credentials(settings: AgentSettings) -> grpc.ServerCredentials | None:
    """TLS (mutual with a client CA) from the settings' PEM files; None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    with open(settings.tls_key_file, "rb") as key, open(settings.tls_cert_file, "rb") as cert:
        pair = (key.read(), cert.read())
    client_ca = None
    if settings.tls_client_ca_file:
        with open(settings.tls_client_ca_file, "rb") as ca:
            client_ca = ca.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
