"""The commands around a proxy process: `serve --workers N` (workers.py), `demo`,
`token` / `api-key` (devtoken.py) and `health` (probe.py)."""
