"""State that must agree across processes, in Redis (the embedded default is memory).

    limits_backend.py  which LimitStore a process uses (memory or Redis) and its lifecycle
    redis_limits.py    the limits in Redis (one Lua script per admission), and the client
                       every Redis store is built with (`client_from_settings`)
    redis_streams.py   resumable streams in Redis Streams: resume on any replica
    redis_cache.py     the response cache's shared level

A new Redis-backed store goes here: it implements the interface its memory twin in core/
defines (core/limitstore.py, core/streambuffer.py, core/cache.py) and is chosen by a
backend setting in core/settings.py.
"""
