"""Memory and compile-time switches change nothing in the math: remat policies, and nn.scan over
the layers (with parameters converted from the unrolled layout)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcjepa_jax.models.vit import VisionTransformer, vit_config

KEY = jax.random.PRNGKey(0)


def unboxed(variables):
    return nn.meta.unbox(variables)


# ----------------------------------------------------------------------------- remat


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_change_memory_not_math(policy):
    """Every named remat policy gives the no-remat loss and gradients (up to float rounding)."""
    cfg = dict(vit_config("mu/8"), depth=2)
    images = jax.random.normal(KEY, (2, 32, 32, 3))
    params = VisionTransformer(**cfg).init(KEY, images)["params"]

    def loss(p, remat):
        return jnp.mean(VisionTransformer(**cfg, remat=remat).apply({"params": p}, images) ** 2)

    ref_loss, ref_grads = jax.value_and_grad(loss)(params, "none")
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, policy)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(unboxed(got_grads)), jax.tree.leaves(unboxed(ref_grads))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="model.remat"):
        VisionTransformer(**cfg, remat="some").init(KEY, images)


# ----------------------------------------------------------------------------- nn.scan


# "all" is the slowest (both conditioned layers); "first" covers the conditioner under scan
# and the encoder and predictor that "none" checks alone (slow: CI time).
@pytest.mark.parametrize("conditioning", [pytest.param("all", marks=pytest.mark.slow), "first",
                                          pytest.param("none", marks=pytest.mark.slow)])
def test_scanned_layers_match_unrolled(conditioning):
    """Scanned models, given the unrolled parameters restacked, compute the same loss and
    gradients as the unrolled ones (encoder, predictor and text encoder)."""
    from configs import synthetic_tiny
    from tcjepa_jax import step as step_lib
    from tcjepa_jax.masks import sample_masks
    from tcjepa_jax.models.scan_params import scanned_from_unrolled

    config = synthetic_tiny.get_config("smoke")
    config.input.image_size = 32
    config.input.max_caption_len = 8
    config.masks.min_keep = 4
    config.model.predictor_depth = 3
    config.model.conditioning = conditioning
    unrolled = step_lib.build_models(config, vocab_size=40)
    config.model.scan_layers = True
    scanned = step_lib.build_models(config, vocab_size=40)

    batch = step_lib.dummy_batch(unrolled, config, batch_size=2)
    rng = np.random.default_rng(0)
    batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
    batch["text_ids"] = rng.integers(3, 40, batch["text_ids"].shape).astype(np.int32)
    batch["text_mask"][:, :, 6:] = False
    for i in range(2):
        for key, value in sample_masks(unrolled.mask_spec, 0, i, 0).items():
            batch[key][i] = value
    params = unboxed(step_lib.init_params(unrolled, config, KEY))
    stacked = scanned_from_unrolled(params)
    # The scanned model's own initialisation has exactly this structure and these shapes.
    own = unboxed(jax.eval_shape(lambda: step_lib.init_params(scanned, config, KEY)))
    assert jax.tree.map(lambda x: x.shape, own) == jax.tree.map(lambda x: x.shape, stacked)

    def loss(models, p):
        return step_lib.loss_fn(p, p["encoder"], batch, models, config)

    # Jitted: op-by-op dispatch of the un-jitted step took most of this test's time.
    (l1, m1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True))(params)
    (l2, m2), g2 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True))(stacked)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for name in m1:
        # The effective rank's eigendecomposition amplifies float rounding: a looser bound.
        rtol = 1e-3 if name.startswith("monitor/") else 1e-5
        np.testing.assert_allclose(m2[name], m1[name], rtol=rtol, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(scanned_from_unrolled(g1))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_resuming_across_scan_layouts_is_a_clear_error():
    import ml_collections
    from tcjepa_jax import resume
    from tcjepa_jax.config_lib import UserError
    config = ml_collections.ConfigDict({"model": {"scan_layers": True}})
    resume.check_layout({"model": {"scan_layers": True}}, config)  # same layout: fine
    with pytest.raises(UserError, match="scan_layers=False"):
        resume.check_layout({"model": {"scan_layers": False}}, config)


@pytest.mark.parametrize("conditioning", ["all", "first"])
def test_one_layer_predictor_converts_to_the_scanned_layout(conditioning):
    """A one-layer predictor looks the same unrolled under "all" and "first"; scanned, "first"
    keeps its layer apart: the conversion must be told which."""
    from configs import synthetic_tiny
    from tcjepa_jax import step as step_lib
    from tcjepa_jax.models.scan_params import scanned_from_unrolled
    config = synthetic_tiny.get_config("smoke")
    config.model.predictor_depth = 1
    config.model.conditioning = conditioning
    unrolled = step_lib.build_models(config, vocab_size=40)
    config.model.scan_layers = True
    scanned = step_lib.build_models(config, vocab_size=40)
    params = unboxed(jax.eval_shape(lambda: step_lib.init_params(unrolled, config, KEY)))
    own = unboxed(jax.eval_shape(lambda: step_lib.init_params(scanned, config, KEY)))
    stacked = jax.eval_shape(lambda p: scanned_from_unrolled(p, conditioning), params)
    assert jax.tree.map(lambda x: x.shape, own) == jax.tree.map(lambda x: x.shape, stacked)
