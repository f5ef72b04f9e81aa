"""DP, FSDP, FSDP+TP and DP+FSDP+TP meshes of 8 devices run the same train step: the same losses
and parameters, with parameters and optimizer state laid out as config.sharding_rules say."""

import jax
import numpy as np
import pytest

from tcjepa_jax import sharding as shard_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax.data import pipeline

import test_train

MESHES = {
    "DP": (("data", 8), ("fsdp", 1), ("tensor", 1)),
    "FSDP": (("data", 1), ("fsdp", 8), ("tensor", 1)),
    "FSDP+TP": (("data", 1), ("fsdp", 4), ("tensor", 2)),
    "DP+FSDP+TP": (("data", 2), ("fsdp", 2), ("tensor", 2)),
}
STEPS = 2


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)


class _Runs:
    """Each mesh's run (losses, final state), trained on first use from the same batches and
    initial state; a deselected mesh costs nothing."""

    def __init__(self, tokenizer_path):
        self.tokenizer_path, self.done = tokenizer_path, {}
        self.host_batches = self.host_init = None

    def __getitem__(self, name):
        if name not in self.done:
            config = test_train.tiny_config(self.tokenizer_path, mesh=MESHES[name])
            run = test_train.Setup(config)
            if self.host_batches is None:
                it = pipeline.make_train_iterator(config, run.tokenizer, run.models.mask_spec)
                self.host_batches = [next(it) for _ in range(STEPS)]
                self.host_init = jax.device_get(step_lib.create_train_state(
                    run.models, config, run.tx, run.shardings))
            state, losses = run.state(self.host_init), []
            for batch in self.host_batches:
                state, metrics = run.step(state, run.batch(batch))
                losses.append(float(metrics["loss"]))
            self.done[name] = dict(losses=losses, state=state, run=run)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tokenizer_path):
    return _Runs(tokenizer_path)


# DP+FSDP+TP uses all three axes at once; FSDP and FSDP+TP alone add little to it (CI time).
@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow)
                                  if m in ("FSDP", "FSDP+TP") else m
                                  for m in MESHES if m != "DP"])
def test_same_losses_and_parameters_as_data_parallel(runs, name):
    dp, other = runs["DP"], runs[name]
    np.testing.assert_allclose(other["losses"], dp["losses"], rtol=1e-5, atol=1e-6)
    a, b = jax.device_get(other["state"]), jax.device_get(dp["state"])
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a),
                                 jax.tree_util.tree_leaves_with_path(b)):
        # Adam's division by sqrt(v) amplifies reduction-order noise where gradients are tiny.
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=3e-5, err_msg=jax.tree_util.keystr(path))


def _spec(array):
    return tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))


def test_parameters_and_optimizer_state_are_sharded_by_the_rules(runs):
    state = runs["DP+FSDP+TP"]["state"]
    enc = state.params["encoder"]["block_0"]
    assert runs["DP+FSDP+TP"]["run"].mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    # embed -> fsdp, mlp -> tensor: the MLP kernels are split over both axes.
    assert _spec(enc["mlp"]["fc1"]["kernel"]) == ("fsdp", "tensor")
    assert _spec(enc["mlp"]["fc2"]["kernel"]) == ("tensor", "fsdp")
    # 3 heads do not split over tensor=2: that axis is replicated, embed still over fsdp.
    assert _spec(enc["attn"]["query"]["kernel"]) == ("fsdp", None, None)
    # The text encoder's 2 heads and the conditioner's MLP do split over tensor.
    text = state.params["text"]["block_0"]["attention"]["q"]["kernel"]
    assert _spec(text) == ("fsdp", "tensor", None)
    cond = state.params["predictor"]["cond_0"]["mlp"]["fc1"]["kernel"]
    assert _spec(cond) == ("fsdp", "tensor")
    # Adam's moments follow their parameters.
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state)
               if hasattr(leaf, "shape") and leaf.shape == enc["mlp"]["fc1"]["kernel"].shape]
    assert moments and all(_spec(m) == ("fsdp", "tensor") for m in moments)
    # Under DP (fsdp and tensor of size 1) every parameter is whole on every device.
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(runs["DP"]["state"]))


def test_mesh_errors():
    from ml_collections import ConfigDict
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        shard_lib.make_mesh(ConfigDict({"mesh": (("data", 2), ("fsdp", 4), ("tensor", 2))}),
                            jax.devices()[:8])
    with pytest.raises(ValueError, match="optionally 'tensor'"):
        shard_lib.make_mesh(ConfigDict({"mesh": (("data", -1), ("model", 1))}))
    assert shard_lib.mesh_shape(ConfigDict({"mesh": (("data", -1), ("fsdp", 2))}), 8) == {
        "data": 4, "fsdp": 2, "tensor": 1}
