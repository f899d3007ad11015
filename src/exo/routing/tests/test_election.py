from hypothesis import given
from hypothesis import strategies as st

from exo.routing.election import LiveNode, elect_master
from exo.shared.types.ids import NodeId


def test_nobody_alive_means_no_master() -> None:
    assert elect_master([]) is None


def test_earliest_started_wins_ties_by_id() -> None:
    nodes = [LiveNode(30, NodeId("c")), LiveNode(10, NodeId("b")), LiveNode(10, NodeId("a"))]
    assert elect_master(nodes) == NodeId("a")


@given(st.lists(st.tuples(st.integers(0, 100), st.text(min_size=1, max_size=4)), min_size=1))
def test_rule_is_order_independent_and_a_joiner_never_unseats(
    raw: list[tuple[int, str]],
) -> None:
    nodes = [LiveNode(started, NodeId(name)) for started, name in raw]
    master = elect_master(nodes)
    assert master == elect_master(list(reversed(nodes)))
    # A node that starts later than everyone never becomes master.
    latest = max(node.started_at_us for node in nodes)
    assert elect_master([*nodes, LiveNode(latest + 1, NodeId("joiner"))]) == master
