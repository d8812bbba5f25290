"""The request path: what an AgentService call goes through inside the proxy.

pipeline.py builds one grpc handler per method from the stages (interceptors/, in the
order of server/chain.py) and the terminal: caching.py (the response cache) in front of
resume.py (resumable streams) in front of forwarding.py (the forwarder: deadline,
retries, the pool), whose streams go through streaming.py (the bounded pump, heartbeats,
the in-band final chunk). health.py and admin.py are the proxy's own services.
"""
