"""The aiproxy process: the rooms below, and the three modules that put them together.

    cli.py        `aiproxy`: the one command line (serve, agent, envoy, demo, health, ...)
    app.py        the assembly of one proxy process: gRPC server, pipeline, pool, stores
    chain.py      the request pipeline's order and the upstream channel interceptors
    telemetry.py  the process's Prometheus registry, metrics endpoint and tracing
    tls.py        TLS credentials from the configured PEM files

    request/      what a call goes through: the pipeline (one handler per method), the
                  forwarder and its retries, the stream pump, the cache, resumable
                  streams, the proxy's own health and admin services
    pool/         the upstream agents: discovery, endpoints and their channels, health
                  and liveness, the breaker per endpoint, the balancer that picks one
    stores/       state shared across processes in Redis: limits, resumable streams, the
                  cache's shared level, and the choice of backend
    edge/         `aiproxy envoy`: the Envoy configuration rendered, Envoy run and drained
    process/      the commands around a proxy process: --workers, the demo, dev tokens,
                  the health probe

Imports only go down this list's layers (pyproject.toml's import-linter contracts): the
commands start the assembly, which builds the request path, which uses the pool and the
stores; the pool and the stores never import anything above them, nor each other.
"""
