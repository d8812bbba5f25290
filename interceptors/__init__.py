"""The proxy's interceptors: one concern per module, each a stage of the request pipeline.

What an interceptor is here. The design card asks for limiting, breaking, deadlines and
error normalization as server and client interceptors. grpc.aio's own
`ServerInterceptor` wraps the handler lookup, so a chain of N of them costs N wrapper
frames per call and, for streams, one more async-generator frame per interceptor per
chunk; it also cannot see the decoded request before the handler does. So each concern
here is a *stage* (stage.py): `bind(method)` once at start-up, then `enter` on the way in
and `exit` when the call ends, composed by server/request/pipeline.py into ONE handler
per method, in the order server/chain.py gives and explains. A stage can refuse a call
(raise a ProxyError), read the caller's metadata and the decoded request, and settle
what it reserved when the call ends, like a server interceptor, at one frame per call.

    request_context.py  the request id
    observability.py    metrics, span attributes, the access log
    auth.py             who the caller is (JWT, API keys)
    limits.py           admission: rate, open streams, LLM tokens
    validation.py       the request contract
    deadline.py         the deadline the upstream call gets
    overload.py         the gate before all of them (not a stage: it runs on raw bytes)
    error_handling.py   exceptions -> the one error shape (core/errors.py)

Client side (towards the agents): upstream_breaker.py (the endpoint's breaker at the
call) and client_observability.py (grpc_client_* metrics, tracing). They are called by
server/pool/endpoint.py around each upstream call rather than installed as grpc.aio
client interceptors, for the same per-call cost; with tracing on, OpenTelemetry's own
client interceptors are real grpc.aio interceptors on the channels.

The pure state machines these use (the breaker, the retry policy) live in core/.
Interceptors import core/ only.
"""
