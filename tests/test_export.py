"""tcjepa_jax.export: our encoder in timm gives our features, the full format round-trips
exactly, and the command works on a real run's workdir (either layer layout).

Parity is measured on float32 CPU: timm's `forward_features` tokens and its pooled output
against our encoder's output tokens and their mean, max abs difference <= 1e-4. The measured
differences are printed (pytest -s shows them).
"""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

import test_train
from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax.config_lib import UserError
from tcjepa_jax.data.tokenizer import Tokenizer
from tcjepa_jax.export import cli, full_format, layout, timm_format
from tcjepa_jax.models.vit import VIT_SIZES, VisionTransformer, vit_config

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("safetensors")
from safetensors.numpy import load_file  # noqa: E402
from safetensors.torch import load_file as torch_load_file  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

TOL = 1e-4
# One intra-op thread: on 2 busy cores torch's thread pool spins for hundreds of ms per call.
torch.set_num_threads(1)


def _config(encoder: str, image_size: int, scan: bool = False):
    return ml_collections.ConfigDict({"model": {"encoder": encoder, "scan_layers": scan},
                                      "input": {"image_size": image_size}})


def _images(batch, size, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _timm_model(state_dict, config):
    """timm's model built without its (slow) initialisation, then loaded with strict=True."""
    with torch.device("meta"):
        model = TimmViT(**timm_format.timm_kwargs(config))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                          strict=True, assign=True)
    return model.eval()


def _parity(encoder_params, config, images) -> dict:
    """Max abs differences of timm's tokens / pooled / forward against our encoder's."""
    # Eager, not jitted: compiling a 12-block ViT costs more than running it op by op here.
    model = VisionTransformer(**vit_config(config.model.encoder),
                              scan=layout.is_scanned(encoder_params))
    ours = np.asarray(model.apply({"params": encoder_params}, images))
    timm_model = _timm_model(timm_format.to_timm(encoder_params, config), config)
    assert all(m.eps == 1e-6 for m in timm_model.modules() if isinstance(m, torch.nn.LayerNorm))
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        tokens = timm_model.forward_features(x)
        pooled = timm_model.forward_head(tokens, pre_logits=True)
        out = timm_model(x)
    diffs = {"tokens": np.abs(tokens.numpy() - ours).max(),
             "pooled": np.abs(pooled.numpy() - ours.mean(1)).max(),
             "forward": np.abs(out.numpy() - ours.mean(1)).max()}
    assert tokens.shape == ours.shape and out.shape == (len(images), ours.shape[-1])
    return diffs


def _perturb(tree, seed):
    """Moves every parameter (biases and LayerNorm scales too), as training does."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [
        np.asarray(x) + rng.normal(0, 0.05, np.shape(x)).astype(np.float32) for x in leaves])


# ---- timm: parity on random and moved weights ------------------------------------------------

@pytest.mark.parametrize("size", ["T", "mu"])
@pytest.mark.parametrize("patch", [8, 16])
def test_timm_parity(size, patch):
    image_size = 48
    config = _config(f"{size}/{patch}", image_size)
    model = VisionTransformer(**vit_config(config.model.encoder))
    images = _images(2, image_size)
    init = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(1), images)["params"]))
    for name, params in (("init", init), ("moved", _perturb(init, 2))):
        diffs = _parity(params, config, images)
        print(f"\nparity {size}/{patch} {name}: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        assert max(diffs.values()) <= TOL, diffs
        # timm -> ours is the exact inverse, in both layer layouts.
        back = timm_format.from_timm(timm_format.to_timm(params, config), config)
        _assert_trees_equal(back, params)
        scanned = timm_format.from_timm(timm_format.to_timm(params, config), config, scan=True)
        _assert_trees_equal(scanned, layout.scanned({"encoder": params})["encoder"])


@pytest.mark.parametrize("size", sorted(VIT_SIZES))
def test_timm_kwargs_build_every_size(size):
    """Every size: timm's model (built on the meta device, no memory) has exactly our shapes."""
    patch = 14 if size in ("H", "G") else 16
    config = _config(f"{size}/{patch}", 224)
    kwargs = timm_format.timm_kwargs(config)
    json.dumps(kwargs)  # goes into the sidecar JSON and the safetensors metadata
    model = VisionTransformer(**vit_config(config.model.encoder))
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(
        jax.random.key(0), jnp.zeros((1, 224, 224, 3))))["params"])
    ours = jax.eval_shape(lambda p: timm_format.convert(p, kwargs, jnp), shapes)
    with torch.device("meta"):
        timm_model = TimmViT(**kwargs)
    theirs = {k: tuple(v.shape) for k, v in timm_model.state_dict().items()}
    assert theirs == {k: tuple(v.shape) for k, v in ours.items()}


# ---- full format: exact round trip -----------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)


def _abstract_params(config):
    models = step_lib.build_models(config, Tokenizer(config.tokenizer.model_path).vocab_size)
    return jax.eval_shape(lambda: nn.unbox(step_lib.init_params(models, config,
                                                                jax.random.key(0))))


def _random_like(shapes, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("conditioning,depth", [("all", 2), ("first", 2), ("first", 1),
                                                ("none", 2)])
@pytest.mark.parametrize("scan", [False, True])
def test_full_round_trip(tokenizer_path, tmp_path, conditioning, depth, scan):
    config = test_train.tiny_config(tokenizer_path)
    config.model.conditioning, config.model.predictor_depth = conditioning, depth
    config.model.scan_layers = scan
    shapes = _abstract_params(config)
    params = _random_like(shapes, 0)
    ema = _random_like(shapes["encoder"], 1)
    path = str(tmp_path / "model.safetensors")
    written = full_format.save_full(path, params, ema, config, step=7)
    assert written == [path, str(tmp_path / "model.config.json")]
    loaded_config, loaded = full_format.load_full(path)
    assert loaded_config.to_dict() == json.loads(config.to_json())
    _assert_trees_equal(loaded["params"], params)     # init_params' structure, same values
    _assert_trees_equal(loaded["ema_params"], ema)
    keys = set(load_file(path))
    assert ("text_encoder/shared/embedding" in keys) == (conditioning != "none")
    assert "context_encoder/block_0/attn/query/kernel" in keys
    assert "target_encoder/norm/scale" in keys
    if scan:  # the file is layout-independent: the unrolled trees come back on request
        _, unrolled = full_format.load_full(path, scan=False)
        _assert_trees_equal(unrolled["params"], layout.unrolled(params))


# ---- the command on a real run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tokenizer_path, tmp_path_factory):
    """A short training run (test_train's config, so its compiled programs are shared) and its
    final state, restored independently of the exporter (the whole TrainState)."""
    from tcjepa_jax import train as train_lib
    config = test_train.tiny_config(tokenizer_path)
    workdir = str(tmp_path_factory.mktemp("export") / "run")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        train_lib.train(config, workdir)
    finally:
        signal.signal(signal.SIGTERM, handler)  # train installs its own
    setup = test_train.Setup(config)
    checkpointer = ckpt_lib.Checkpointer(workdir, config)
    state = jax.device_get(checkpointer.restore(test_train.TOTAL_STEPS,
                                                           setup.abstract_state()))
    checkpointer.close()
    return config, workdir, state


def _load_timm(path):
    with open(full_format.sidecar(path, ".json")) as f:
        info = json.load(f)
    model = TimmViT(**info["timm_kwargs"]).eval()
    model.load_state_dict(torch_load_file(path), strict=True)
    return info, model


@pytest.mark.parametrize("encoder,image_size", [("target", None), ("context", 48)])
def test_cli_timm_on_trained_run(trained, tmp_path, encoder, image_size):
    """The documented PyTorch lines (build from FILE.json, load strictly) give our features;
    --image_size builds the model for another input size (our sin-cos grid follows it)."""
    config, workdir, state = trained
    out = str(tmp_path / f"{encoder}.safetensors")
    result = cli.export(workdir, out, "timm", encoder=encoder, image_size=image_size)
    assert result["step"] == test_train.TOTAL_STEPS
    params = state.ema_params if encoder == "target" else state.params["encoder"]
    info, model = _load_timm(out)
    size = image_size or config.input.image_size
    expected = timm_format.timm_kwargs(_config(config.model.encoder, size))
    assert info["encoder"] == encoder and info["timm_kwargs"] == expected
    assert json.loads(safe_open_metadata(out)["timm_kwargs"]) == expected
    _assert_trees_equal(timm_format.from_timm(model.state_dict(), _config(
        config.model.encoder, size)), params)
    diffs = _parity(params, _config(config.model.encoder, size), _images(4, size, seed=3))
    print(f"\nparity trained {config.model.encoder} {encoder} at {size} px: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs


def safe_open_metadata(path):
    from safetensors import safe_open
    with safe_open(path, "np") as f:
        return f.metadata()


def test_cli_full_on_trained_run_and_scanned_checkpoint(trained, tmp_path):
    config, workdir, state = trained
    out = str(tmp_path / "full.safetensors")
    cli.export(workdir, out, "full")
    loaded_config, loaded = full_format.load_full(out)
    assert loaded_config.model.encoder == config.model.encoder
    _assert_trees_equal(loaded["params"], state.params)
    _assert_trees_equal(loaded["ema_params"], state.ema_params)

    # The same run saved in the scan_layers layout exports to the same files' contents.
    scan_config = ml_collections.ConfigDict(config.to_dict())
    scan_config.model.scan_layers = True
    scan_dir = tmp_path / "scan"
    scanned = layout.scanned(state.params, config.model.conditioning)
    assert _shapes(_abstract_params(scan_config)) == _shapes(scanned)
    with ocp.CheckpointManager(str(scan_dir / "checkpoints"),
                               item_names=("state", "config")) as manager:
        manager.save(9, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": np.int32(9), "params": scanned,
                                         "ema_params": layout.scanned(
                                             {"encoder": state.ema_params})["encoder"]}),
            config=ocp.args.JsonSave(json.loads(scan_config.to_json()))))
    for fmt in ("timm", "full"):
        a, b = str(tmp_path / f"a.{fmt}.safetensors"), str(tmp_path / f"b.{fmt}.safetensors")
        cli.export(workdir, a, fmt)
        assert cli.export(str(scan_dir), b, fmt)["step"] == 9
        la, lb = load_file(a), load_file(b)
        assert la.keys() == lb.keys()
        for key in la:
            np.testing.assert_array_equal(la[key], lb[key], err_msg=key)
    _, reloaded = full_format.load_full(b)  # back in the scanned layout, as the config says
    _assert_trees_equal(reloaded["params"], scanned)


def test_cli_step_and_errors(trained, tmp_path):
    _, workdir, _ = trained
    out = str(tmp_path / "x.safetensors")
    assert cli.export(workdir, out, step=3)["step"] == 3
    with pytest.raises(UserError, match="no checkpoint of step 4"):
        cli.export(workdir, out, step=4)
    with pytest.raises(UserError, match="no checkpoint under"):
        cli.export(str(tmp_path / "nothing"), out)
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(UserError, match="no checkpoint under"):
        cli.export(str(tmp_path / "empty"), out)


def test_command_line(trained, tmp_path):
    """python -m tcjepa_jax.export: writes the files; a workdir without checkpoints is one
    error line and exit status 1."""
    _, workdir, _ = trained
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        filter(None, [test_train.REPO, os.environ.get("PYTHONPATH")])))
    env.pop("XLA_FLAGS", None)
    out = str(tmp_path / "enc.safetensors")
    script = ("import sys; from tcjepa_jax.export.cli import run; "
              "sys.argv[0] = 'tcjepa-export'; run()")
    ok = subprocess.run([sys.executable, "-m", "tcjepa_jax.export", f"--workdir={workdir}",
                         f"--out={out}", "--encoder=context"],
                        env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert os.path.exists(out) and os.path.exists(str(tmp_path / "enc.json"))
    bad = subprocess.run([sys.executable, "-c", script, f"--workdir={tmp_path / 'none'}",
                          f"--out={out}"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "error: no checkpoint under" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
