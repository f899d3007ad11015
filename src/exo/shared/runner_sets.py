"""The health of an instance's runner sets, as the cluster state shows it: one rule for the
master (heal when the serving set breaks, switch when the incoming one is ready), the
workers (stop a rank whose pipeline broke, forward a task once its set is ready), ``apply``
and the API (wait for a healing instance, fail a request on a failed one).

A set is one pipeline: its runners, one per rank, talk over one ring. It is *broken* when a
runner of it failed or stopped, or the node of one of its shards left the cluster: the
other ranks would wait on the ring forever. It is *ready* when every runner reports ready
or running.
"""

from typing import Literal

from exo.shared.types.instances import Instance, Shard
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.state import State

SERVING_STATUSES: frozenset[RunnerStatus] = frozenset({"ready", "running"})

InstanceStatus = Literal["ready", "loading", "healing", "failed"]
"""``healing``: its serving set broke and a new one is (or is about to be) loading; requests
wait for it. ``failed``: it cannot serve, and nothing will heal it (``failure`` says why, or
``rebalance`` is ``off``)."""


def set_breakage(state: State, shards: list[Shard]) -> str | None:
    """Why the set cannot run (None: nothing is known to be wrong with it): a node that
    left before a runner that failed before a runner that stopped, whatever their ranks (the
    later ones are usually what the first caused: the other ranks stop when one is lost)."""
    for shard in shards:
        if shard.node_id not in state.nodes:
            return f"node {shard.node_id} (rank {shard.rank}) left the cluster"
    for wanted in ("failed", "shut_down"):
        for shard in shards:
            runner = state.runners.get(shard.runner_id)
            if runner is None or runner.status != wanted:
                continue
            if wanted == "failed":
                return f"runner {shard.runner_id} (rank {shard.rank}) failed: {runner.error}"
            return f"runner {shard.runner_id} (rank {shard.rank}) stopped"
    return None


def set_ready(state: State, shards: list[Shard]) -> bool:
    """Every runner of the set reports ready or running."""
    for shard in shards:
        runner = state.runners.get(shard.runner_id)
        if runner is None or runner.status not in SERVING_STATUSES:
            return False
    return bool(shards)


def _statuses(state: State, shards: list[Shard]) -> str:
    return ", ".join(
        f"rank {shard.rank}: "
        + (runner.status if (runner := state.runners.get(shard.runner_id)) else "starting")
        for shard in sorted(shards, key=lambda shard: shard.rank)
    )


def instance_health(state: State, instance: Instance) -> tuple[InstanceStatus, str | None]:
    """The instance's status for requests, and why when it is not ready."""
    if instance.failure is not None:
        return "failed", instance.failure
    broken = set_breakage(state, instance.shards)
    if broken is not None:
        if instance.incoming is not None:
            return "healing", (
                f"{broken}; a new placement is loading ({_statuses(state, instance.incoming.shards)})"
            )
        if instance.rebalance != "off":
            return "healing", f"{broken}; the master is placing it again"
        return "failed", f"{broken} (rebalance is off, so it is not healed)"
    if set_ready(state, instance.shards):
        return "ready", None
    return "loading", "runners are " + _statuses(state, instance.shards)
