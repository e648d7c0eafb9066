"""The chaos run's pure parts: the plan drawn from a seed, and how extra executions count."""

from __future__ import annotations

from collections import Counter

from tests.chaos.figures import _extra
from tests.chaos.harness import _replay, smoke
from tests.chaos.plan import ALL, ChaosConfig, make_plan
from tests.chaos.workflows import WORKFLOWS, problem_of


def test_a_seed_gives_the_same_plan_and_another_seed_another() -> None:
    config = ChaosConfig(seed=7)
    assert make_plan(config) == make_plan(ChaosConfig(seed=7))
    assert make_plan(config) != make_plan(ChaosConfig(seed=8))


def test_the_plan_has_every_fault_asked_for_inside_the_chaos_phase() -> None:
    config = ChaosConfig(seed=3)
    plan = make_plan(config)
    kinds = Counter(f.kind for f in plan.faults)
    assert kinds["orchestrator"] == config.orchestrator_kills
    assert kinds["worker"] == config.worker_kills
    assert kinds["redis"] == config.redis_restarts
    assert kinds["postgres"] == config.postgres_restarts
    assert kinds["connections"] == config.connection_drops
    assert kinds["orchestrator_pause"] + kinds["worker_pause"] == config.pauses
    assert kinds["orchestrator_restart"] + kinds["worker_restart"] == config.graceful_restarts
    assert [f.target for f in plan.faults].count(ALL) == 1  # all orchestrators once
    assert all(0.1 * config.duration <= f.at <= 0.9 * config.duration for f in plan.faults)
    assert len(plan.submissions) == config.runs
    assert len({s.run_id for s in plan.submissions}) == config.runs
    assert {s.workflow for s in plan.submissions} == {w.name for w in WORKFLOWS}


def test_the_smoke_plan_has_one_fault_of_each_kind_and_kills_single_processes() -> None:
    plan = make_plan(smoke(ChaosConfig(seed=11)))
    kinds = Counter(f.kind.removesuffix("_pause").removesuffix("_restart") for f in plan.faults)
    assert kinds["orchestrator"] >= 1 and kinds["worker"] >= 1
    assert kinds["redis"] == kinds["postgres"] == kinds["connections"] == 1
    assert ALL not in [f.target for f in plan.faults]


def test_extra_executions_after_a_redis_loss_are_put_down_to_it_and_only_those() -> None:
    # one attempt served twice; Redis lost its data at 5.0
    assert _extra([1.0, 6.0], 1, since=0.5, losses=[5.0]) == (1, 1)
    assert _extra([1.0, 6.0], 1, since=0.5, losses=[]) == (1, 0)
    assert _extra([1.0, 6.0], 1, since=0.5, losses=[7.0]) == (1, 0)  # after: no excuse
    assert _extra([1.0, 6.0], 1, since=0.5, losses=[0.2]) == (1, 0)  # before the dispatch
    assert _extra([1.0], 1, since=0.5, losses=[5.0]) == (0, 0)
    assert _extra([1.0, 2.0], 2, since=0.5, losses=[]) == (0, 0)  # two attempts, two calls


def test_a_run_is_wrong_for_an_unexpected_status_or_output() -> None:
    assert problem_of("chaos-chain", "completed", {"x": 1}, {"x": 3}) is None
    assert problem_of("chaos-chain", "completed", {"x": 1}, {"x": 2}) is not None
    assert problem_of("chaos-chain", "failed", {"x": 1}, None) is not None
    assert problem_of("chaos-doomed", "failed", {}, None) is None
    assert problem_of("chaos-doomed", "completed", {}, None) is not None


def test_the_replay_line_keeps_the_arguments_and_sets_the_seed() -> None:
    assert (
        _replay(["--smoke", "--seed", "5", "-v"], 9) == "python -m tests.chaos --smoke -v --seed 9"
    )
    assert _replay(["--seed=5", "--runs", "3"], 9) == "python -m tests.chaos --runs 3 --seed 9"
