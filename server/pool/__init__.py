"""The upstream pool: the agent replicas calls are sent to.

discovery.py  where the endpoints are (static addresses, DNS names re-resolved)
pool.py       the endpoints, their breakers, the usable set (UpstreamPool)
balancer.py   which usable endpoint takes the next call or retry (P2C; a session's
              calls: rendezvous hashing with bounded loads)
endpoint.py   one replica: its channels and the calls sent on them
calls.py      the calls in flight on an endpoint, the upstream stream wrapper
health.py     the supervised health-following and liveness tasks of an endpoint
backlog.py    how long new calls wait in this process's own gRPC queue
"""
