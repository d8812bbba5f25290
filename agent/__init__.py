"""The reference AI agent service: the upstream that aiproxy fronts in demos and tests.

A real grpc.aio implementation of ai.agent.v1.AgentService that is offline and
deterministic (same request, same answer), paces its output like an LLM, and can be
told to fail on purpose through request metadata (see agent.faults).
"""
