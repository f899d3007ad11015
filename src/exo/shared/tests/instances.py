"""Instances for tests that need one but do not test placement."""

from exo.shared.types.ids import DeviceId, InstanceId, NodeId, RunnerId
from exo.shared.types.instances import Instance, PlacementDecision, Shard

GREEDY = PlacementDecision(
    strategy="greedy",
    heterogeneous=False,
    predicted_ms_per_token=1.0,
    greedy_ms_per_token=1.0,
    solve_ms=0.0,
)


def single_shard_instance(
    model_id: str = "m",
    *,
    node_id: str = "n0",
    device_id: str = "cpu:0",
    end_layer: int = 6,
    instance_id: str = "i0",
    runner_id: str = "r0",
) -> Instance:
    """``model_id`` on one device of one node, layers ``[0, end_layer)``."""
    shard = Shard(
        runner_id=RunnerId(runner_id),
        node_id=NodeId(node_id),
        device_id=DeviceId(device_id),
        rank=0,
        world_size=1,
        start_layer=0,
        end_layer=end_layer,
    )
    return Instance(
        instance_id=InstanceId(instance_id), model_id=model_id, shards=[shard], placement=GREEDY
    )
