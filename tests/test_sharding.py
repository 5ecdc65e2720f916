"""Sharded loading on 4 fake CPU devices gives the single-device logits."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cosa_jax import sharding as shd
from cosa_jax.models import load_hf
from cosa_jax.models.llama import forward
from cosa_jax.testing.model_fixtures import make_hf_model, right_padded_batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_shard")
    make_hf_model(path)
    return path


def test_every_param_has_one_rule(tiny):
    model, _ = load_hf(tiny)
    paths = {shd.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(model.params())}
    assert paths == set(shd.PARAM_LOGICAL_AXES)  # untied, so lm_head is present too


@pytest.mark.parametrize("mesh_shape", [(1, 4, 1), (2, 2, 1), (1, 2, 2)])
def test_sharded_load_matches_single_device(tiny, mesh_shape):
    assert len(jax.devices()) == 4, "conftest must provide 4 fake CPU devices"
    ids, mask = right_padded_batch(320, [19, 11, 16, 7], seed=3)
    single, cfg = load_hf(tiny)
    ref = np.asarray(jax.jit(forward, static_argnums=1)(single.params(), cfg, ids, mask))

    mesh = shd.make_mesh(mesh_shape)
    sharded, cfg2 = load_hf(tiny, mesh=mesh)
    params = sharded.params()
    q = params["layers"]["q_proj"]
    assert q.sharding.spec == shd.logical_to_spec(shd.PARAM_LOGICAL_AXES["layers/q_proj"],
                                                  q.shape, mesh)
    if mesh_shape[1] > 1:
        assert "fsdp" in tuple(q.sharding.spec)
        assert q.addressable_shards[0].data.shape[1] == q.shape[1] // mesh_shape[1]
    batch = jax.device_put(ids, shd.batch_sharding(mesh)), jax.device_put(mask, shd.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        out = np.asarray(jax.jit(forward, static_argnums=1)(params, cfg2, *batch))
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= 1e-5


def test_make_mesh_rejects_wrong_device_count():
    with pytest.raises(ValueError, match="needs 8 devices"):
        shd.make_mesh((2, 4, 1))


def test_indivisible_dims_are_replicated():
    mesh = shd.make_mesh((1, 4, 1))
    assert shd.logical_to_spec(("embed", "mlp"), (6, 8), mesh) == P(None, None)
    assert shd.logical_to_spec(("embed", "mlp"), (8, 8), mesh) == P("fsdp", None)
