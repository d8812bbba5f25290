"""Per-method deadline limits, the effective timeout, and the Deadline value."""

from __future__ import annotations

import pytest

from aiproxy.core.service import agent_service
from aiproxy.interceptors.deadline import Deadline, DeadlineLimit, EndMargin, MethodDeadlines
from tests.support.clock import FakeClock

SERVICE = agent_service()
UNARY = DeadlineLimit(default_s=30, max_s=30)
STREAM = DeadlineLimit(default_s=120, max_s=120)
AGENT = DeadlineLimit(default_s=300, max_s=300)


def path(method: str) -> str:
    return f"/ai.agent.v1.AgentService/{method}"


@pytest.fixture
def deadlines() -> MethodDeadlines:
    return MethodDeadlines.for_service(SERVICE, unary=UNARY, stream=STREAM, agent=AGENT)


@pytest.mark.parametrize(
    ("method", "limit"),
    [
        ("Generate", UNARY),
        ("Chat", UNARY),
        ("SearchRag", UNARY),
        ("BatchGenerate", UNARY),
        ("StreamGenerate", STREAM),
        ("StreamChat", STREAM),
        ("StreamRagGenerate", STREAM),
        ("ExecuteAgent", AGENT),
        ("StreamExecuteAgent", AGENT),
    ],
)
def test_every_method_gets_its_kinds_limit(
    deadlines: MethodDeadlines, method: str, limit: DeadlineLimit
) -> None:
    assert deadlines.limit_for(path(method)) == limit


def test_unknown_methods_get_the_unary_limit(deadlines: MethodDeadlines) -> None:
    assert deadlines.limit_for("/grpc.health.v1.Health/Check") == UNARY
    assert deadlines.limit_for("/nope") == UNARY


def test_overrides_win_by_method_name() -> None:
    short = DeadlineLimit(default_s=5, max_s=10)
    deadlines = MethodDeadlines.for_service(
        SERVICE, unary=UNARY, stream=STREAM, agent=AGENT, overrides={"StreamExecuteAgent": short}
    )
    assert deadlines.limit_for(path("StreamExecuteAgent")) == short
    assert deadlines.limit_for(path("ExecuteAgent")) == AGENT


def test_names_that_are_not_methods_are_refused() -> None:
    with pytest.raises(ValueError, match="Genrate"):
        MethodDeadlines.for_service(
            SERVICE, unary=UNARY, stream=STREAM, agent=AGENT, overrides={"Genrate": UNARY}
        )


def test_effective_timeout_is_the_tighter_of_caller_and_maximum() -> None:
    deadlines = MethodDeadlines(DeadlineLimit(default_s=10, max_s=30))
    assert deadlines.effective_timeout("/x", None) == 10  # caller set none: the default
    assert deadlines.effective_timeout("/x", 5.5) == 5.5  # caller is tighter
    assert deadlines.effective_timeout("/x", 3600) == 30  # the maximum is tighter
    assert deadlines.effective_timeout("/x", -0.2) == 0  # already passed


def test_effective_timeout_per_method(deadlines: MethodDeadlines) -> None:
    assert deadlines.effective_timeout(path("ExecuteAgent"), 1000) == 300
    assert deadlines.effective_timeout(path("StreamChat"), None) == 120
    assert deadlines.effective_timeout(path("Generate"), 2) == 2


@pytest.mark.parametrize(("default_s", "max_s"), [(0, 1), (-1, 1), (2, 1)])
def test_bad_limits_are_refused(default_s: float, max_s: float) -> None:
    with pytest.raises(ValueError):
        DeadlineLimit(default_s, max_s)


def test_deadline_counts_down_and_expires() -> None:
    clock = FakeClock(50.0)
    deadline = Deadline.from_timeout(2.5, clock)
    assert deadline.expires_at == 52.5
    assert deadline.remaining() == 2.5 and not deadline.expired
    clock.now = 52.0
    assert deadline.remaining() == 0.5
    clock.now = 52.5
    assert deadline.expired and deadline.remaining() == 0
    clock.now = 60
    assert deadline.remaining() == 0


def test_deadlines_order_by_expiry() -> None:
    clock = FakeClock(50.0)
    near, far = Deadline.from_timeout(1, clock), Deadline.from_timeout(5, clock)
    assert min(far, near) is near
    assert Deadline.from_timeout(1, clock) == near


def test_deadline_defaults_to_the_monotonic_clock() -> None:
    deadline = Deadline.from_timeout(60)
    assert 59 < deadline.remaining() <= 60


# ---- the end margin: the proxy answers before the caller's deadline ------------------------


def test_end_margin_is_a_clamped_share_of_the_callers_time() -> None:
    margin = EndMargin(ratio=0.05, min_s=0.02, max_s=1.0)
    assert margin.for_remaining(10) == pytest.approx(0.5)  # 5 %
    assert margin.for_remaining(0.3) == pytest.approx(0.02)  # at least min_s
    assert margin.for_remaining(100) == pytest.approx(1.0)  # at most max_s
    assert margin.for_remaining(0.01) == pytest.approx(0.005)  # never more than half
    assert margin.for_remaining(0) == 0 and margin.for_remaining(-1) == 0
    assert EndMargin().for_remaining(5) == 0  # the default: no margin


def test_effective_timeout_ends_before_the_callers_deadline_only_when_it_binds() -> None:
    deadlines = MethodDeadlines(
        DeadlineLimit(10, 30), margin=EndMargin(ratio=0.05, min_s=0.02, max_s=1.0)
    )
    assert deadlines.effective_timeout("/x", None) == 10  # no caller deadline: the default
    assert deadlines.effective_timeout("/x", 0.3) == pytest.approx(0.28)  # the caller's binds
    assert deadlines.effective_timeout("/x", 3600) == 30  # the maximum binds: no margin
    assert deadlines.effective_timeout("/x", 30.5) == pytest.approx(
        29.5
    )  # close call: the margin wins
    assert deadlines.effective_timeout("/x", -0.2) == 0


def test_settings_carry_the_margin_to_every_method() -> None:
    from aiproxy.core.settings import load_settings
    from aiproxy.server.chain import method_deadlines

    deadlines = method_deadlines(load_settings())
    assert deadlines.margin == EndMargin(0.05, 0.02, 1.0)
    assert deadlines.effective_timeout(path("Generate"), 1.0) == pytest.approx(0.95)
