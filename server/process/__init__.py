"""The commands around a proxy process: `serve --workers N` (workers.py), `demo`,
`token` / `api-key` (devtoken.py), `health` (probe.py) and `model-server` (localmodel.py:
a small real model on loopback, for `demo --model-server local`, the tests and the bench)."""
