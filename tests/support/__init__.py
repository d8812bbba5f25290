"""What the tests share, one concern a module:

- pipeline: a request pipeline in front of a stand-in agent on a real server
  (`channel_for(agent, stages)`), for tests of stages and of the pipeline's own frame;
- procs: real processes (agent, proxy) on port 0, started and stopped by PID;
- edge: HTTP through a real Envoy; fake_openai: an OpenAI-compatible HTTP server;
- redis_server, limits_client: a fresh redis-server, a second process on the same limits;
- grpc_helpers: stubs, health waits, wire-timeout bounds; waiting: wait for a state;
- clock: the injected FakeClock; certs: key material made at test time; docs: the
  Markdown documents' code blocks.
"""
