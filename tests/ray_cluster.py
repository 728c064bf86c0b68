"""A Ray cluster on loopback for the Ray executor tests, shared by the whole session.

A head with no CPUs (so no actor lands on it) and two worker nodes that each offer one
{"gpu_slot": 1}: the stand-in for two one-GPU machines. Health checks are fast so that a node
killed by a test is declared dead in ~2 s instead of ~15 s. conftest.py has already put Ray on
127.0.0.1 and switched off auth and usage stats before anything imported ray.
"""
from __future__ import annotations

import pytest

GPU_SLOT = "gpu_slot"
SLOT_NODES = 2
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_initial_delay_ms": 0,
}


class SlotCluster:
    """A ray.cluster_utils.Cluster whose worker nodes can be killed and topped up again."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS})
        self.top_up()

    @property
    def address(self) -> str:
        return self.cluster.address

    def top_up(self) -> None:
        """Bring the cluster back to SLOT_NODES live slot nodes (a test may have killed one)."""
        while len(self.cluster.worker_nodes) < SLOT_NODES:
            self.cluster.add_node(num_cpus=1, resources={GPU_SLOT: 1},
                                  object_store_memory=100 * 2**20)
        self.cluster.wait_for_nodes()

    def nodes_with_live_actor(self, class_name: str) -> list[str]:
        """Ids of the slot nodes where an actor of `class_name` has finished its constructor."""
        alive = self.cluster.global_state.actor_table(None, actor_state_name="ALIVE").values()
        hosts = {a["Address"]["NodeID"] for a in alive if a["ActorClassName"] == class_name}
        return [node.node_id for node in self.cluster.worker_nodes if node.node_id in hosts]

    def kill_node(self, node_id: str) -> None:
        """Kill a node's processes at once, as a machine that loses power would."""
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="session")
def slot_cluster_session():
    cluster = SlotCluster()
    yield cluster
    cluster.shutdown()


@pytest.fixture
def slot_cluster(slot_cluster_session: SlotCluster) -> SlotCluster:
    """The session cluster with both slot nodes alive."""
    slot_cluster_session.top_up()
    return slot_cluster_session
