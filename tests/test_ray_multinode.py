"""Placement on a simulated multi-node cluster: STRICT_SPREAD puts draft and target on different nodes,
with fake GPUs, and the output does not change."""

import os
import tempfile

import pytest
import ray

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.testing import TabularLM

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(ray_default_ports_module):
    from ray.cluster_utils import Cluster

    from ray_utils import release_shared_ray

    release_shared_ray()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp  # the cluster helper writes its address file under <RAY_TMPDIR>/ray
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    c = Cluster(initialize_head=True, connect=True,
                head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": tmp})
    nodes = [c.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.mark.parametrize("transport", ["actor", "gloo"])
def test_strict_spread_places_draft_and_target_on_different_nodes(cluster, transport):
    target, draft = TabularLM(6, seed=0), TabularLM(6, seed=5)
    params = SamplingParams(max_new_tokens=15, ignore_eos=True, temperature=1.0, seed=7)
    want = [o.token_ids for o in PearlEngine(draft_model=draft, target_model=target, gamma=3)
            .generate([[1, 2], [3]], params)]
    eng = PearlEngine(draft_model=draft, target_model=target, gamma=3, backend="ray", placement="STRICT_SPREAD",
                      draft_num_gpus=0.5, target_num_gpus=1, transport=transport)
    try:
        info = eng.backend.info
        assert info["draft"]["node_id"] != info["target"]["node_id"]
        assert len(info["draft"]["gpu_ids"]) == 1 and len(info["target"]["gpu_ids"]) == 1
        outs = eng.generate([[1, 2], [3]], params)
        assert [o.token_ids for o in outs] == want
        assert all(o.stats.draft_forwards > 0 and o.stats.draft_failures == 0 for o in outs)
    finally:
        eng.shutdown()
    if transport != "actor":
        return
    packed = PearlEngine(draft_model=draft, target_model=target, gamma=3, backend="ray", placement="STRICT_PACK",
                         draft_num_cpus=0.5, target_num_cpus=0.5, transport="gloo", colocate=False)
    try:
        info = packed.backend.info
        assert info["draft"]["node_id"] == info["target"]["node_id"]
        assert [o.token_ids for o in packed.generate([[1, 2], [3]], params)] == want
    finally:
        packed.shutdown()


def test_draft_on_one_node_and_a_tensor_parallel_target_on_another(cluster, tiny_pair):
    """Three nodes (a head without CPUs and two GPU nodes): the TP=2 group takes one node's two GPUs (its
    ranks always share a node), the draft the other node's; the link crosses nodes; the output is unchanged."""
    target, draft = str(tiny_pair["target"]), str(tiny_pair["draft"])
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    with PearlEngine(draft, target, gamma=3) as ref:
        want = [o.token_ids for o in ref.generate([[1, 5, 9], [2, 7]], params, method="ar")]
    eng = PearlEngine(draft, target, gamma=3, backend="ray", tensor_parallel_size=2, placement="PACK",
                      draft_num_gpus=1, target_num_gpus=1, draft_num_cpus=0.5, target_num_cpus=0.5)
    try:
        info = eng.backend.info
        ranks = info["target"]["ranks"]
        assert len({r["node_id"] for r in ranks}) == 1
        assert info["draft"]["node_id"] != ranks[0]["node_id"]
        assert all(len(r["gpu_ids"]) == 1 for r in ranks) and ranks[0]["gpu_ids"] != ranks[1]["gpu_ids"]
        outs = eng.generate([[1, 5, 9], [2, 7]], params)
        assert [o.token_ids for o in outs] == want
        assert all(o.stats.draft_forwards > 0 and o.stats.draft_failures == 0 for o in outs)
    finally:
        eng.shutdown()
