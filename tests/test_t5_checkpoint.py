"""model.text_checkpoint: a Hugging Face T5 v1.1 encoder loaded into our T5Encoder.

A randomly initialised transformers.T5EncoderModel of T5_SIZES["tiny"] (gated GELU, 32 buckets,
max distance 128) is saved with save_pretrained next to a SentencePiece model; our loader must
give the same hidden states, from safetensors, sharded safetensors and pytorch_model.bin, and a
mismatching checkpoint must fail with one message before any compilation. Needs torch,
safetensors and transformers (skipped without them).
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from configs import synthetic_tiny  # noqa: E402
from tcjepa_jax import optim  # noqa: E402
from tcjepa_jax import sharding as shard_lib  # noqa: E402
from tcjepa_jax import step as step_lib  # noqa: E402
from tcjepa_jax.config_lib import UserError  # noqa: E402
from tcjepa_jax.data import pipeline, synthetic  # noqa: E402
from tcjepa_jax.data.tokenizer import train_tokenizer  # noqa: E402
from tcjepa_jax.experiment import setup  # noqa: E402
from tcjepa_jax.models import t5_checkpoint as ckpt  # noqa: E402
from tcjepa_jax.models.text import T5_SIZES, T5Encoder  # noqa: E402

VOCAB = 300
TINY = T5_SIZES["tiny"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """(folder, model): a random T5 v1.1 encoder as save_pretrained writes it, + spiece.model."""
    folder = tmp_path_factory.mktemp("t5")
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=TINY["width"], num_layers=TINY["depth"],
        num_heads=TINY["num_heads"], d_kv=TINY["head_dim"], d_ff=TINY["mlp_dim"],
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
        relative_attention_max_distance=128, tie_word_embeddings=False, dropout_rate=0.0)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():  # HF inits norms to 1: make them matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    spiece = train_tokenizer(synthetic.iter_captions(0, 300), str(folder / "spiece"), 200)
    assert spiece == str(folder / "spiece.model")
    return str(folder), model


def _ids(seed=0, lengths=(12, 7, 1)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (len(lengths), max(lengths))).astype(np.int32)
    mask = np.arange(ids.shape[1])[None] < np.array(lengths)[:, None]
    return np.where(mask, ids, 0), mask


def _ours(params, ids, mask, scan=False):
    model = T5Encoder(vocab_size=VOCAB, **TINY, scan=scan)
    return np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))


def _hf(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long(),
                     attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()


@pytest.mark.parametrize("scan", [False, True])
def test_hidden_states_match_hf(hf_folder, scan):
    folder, model = hf_folder
    params = ckpt.load_text_params(folder, "tiny", scan=scan)
    # The tree is exactly our module's: same paths, same shapes.
    init = jax.eval_shape(T5Encoder(vocab_size=VOCAB, **TINY, scan=scan).init,
                          jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, nn.unbox(init["params"]))
    ids, mask = _ids()
    ours, ref = _ours(params, ids, mask, scan), _hf(model, ids, mask)
    diff = np.abs(ours - ref)[mask].max()
    print(f"max |ours - HF| over non-pad positions: {diff:.2e}")
    assert diff < 1e-4 and np.abs(ref[mask]).mean() > 0.1
    # Pads (whatever their ids) change no non-pad output, in ours and in HF's.
    other = np.where(mask, ids, _ids(seed=1)[0])
    np.testing.assert_allclose(_ours(params, other, mask, scan)[mask], ours[mask], atol=1e-5)
    np.testing.assert_allclose(_hf(model, other, mask)[mask], ref[mask], atol=1e-5)


def test_relative_position_buckets_match_hf_at_every_distance():
    from transformers.models.t5.modeling_t5 import T5Attention
    from tcjepa_jax.models.text import relative_position_bucket
    rp = np.arange(-300, 301)
    ref = T5Attention._relative_position_bucket(torch.from_numpy(rp), bidirectional=True,
                                                num_buckets=32, max_distance=128).numpy()
    np.testing.assert_array_equal(np.asarray(relative_position_bucket(jnp.asarray(rp))), ref)


def test_bin_sharded_and_bytes_load_the_same(hf_folder, tmp_path, monkeypatch):
    folder, model = hf_folder
    want = ckpt.load_text_params(folder, "tiny")
    same = lambda got: jax.tree.map(np.testing.assert_array_equal, got, want)
    binary = tmp_path / "bin"
    binary.mkdir()
    for name in ("config.json", "spiece.model"):
        shutil.copy(os.path.join(folder, name), binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    same(ckpt.load_text_params(str(binary), "tiny"))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    same(ckpt.load_text_params(str(sharded), "tiny"))
    monkeypatch.setattr(ckpt.paths, "is_url", lambda path: True)  # the gs:// path: read bytes
    same(ckpt.load_text_params(folder, "tiny"))
    same(ckpt.load_text_params(str(binary), "tiny"))


def _copy(folder, dest, **config_changes):
    shutil.copytree(folder, dest)
    with open(os.path.join(dest, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump({**cfg, **config_changes}, f)
    return str(dest)


def test_mismatches_are_one_clear_message(hf_folder, tmp_path):
    folder, _ = hf_folder
    with pytest.raises(ValueError, match=r"d_model=64 \(model.text='base' has 768\).*"
                       r"set --config.model.text=tiny, which matches"):
        ckpt.check_checkpoint(folder, "base")
    relu = _copy(folder, tmp_path / "relu", feed_forward_proj="relu")
    with pytest.raises(ValueError, match="feed_forward_proj='relu'.*not supported"):
        ckpt.check_checkpoint(relu, "tiny")
    odd = _copy(folder, tmp_path / "odd", d_ff=96)
    with pytest.raises(ValueError, match="d_ff=96.*no T5_SIZES entry"):
        ckpt.check_checkpoint(odd, "tiny")
    buckets = _copy(folder, tmp_path / "buckets", relative_attention_num_buckets=64)
    with pytest.raises(ValueError, match="relative_attention_num_buckets=64.*cannot be loaded"):
        ckpt.check_checkpoint(buckets, "tiny")
    from safetensors.numpy import load_file, save_file
    holes = _copy(folder, tmp_path / "holes")
    tensors = load_file(os.path.join(holes, "model.safetensors"))
    del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    tensors["encoder.final_layer_norm.weight"] = np.ones(32, np.float32)
    save_file(tensors, os.path.join(holes, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensors, e.g. encoder.block.1.layer.1."
                       r"DenseReluDense.wo.weight; shapes differ: encoder.final_layer_norm"):
        ckpt.check_checkpoint(holes, "tiny")
    with pytest.raises(ValueError, match="vocab_size=300 rows, but model.text_vocab_size=500"):
        ckpt.check_checkpoint(folder, "tiny", text_vocab_size=500)
    os.remove(os.path.join(holes, "model.safetensors"))
    with pytest.raises(ValueError, match="no weights there"):
        ckpt.check_checkpoint(holes, "tiny")


def _config(folder, mesh=(("data", 2), ("fsdp", 4))):
    """tests/test_train.py's tiny training config, its text encoder the checkpoint's."""
    config = synthetic_tiny.get_config("smoke")
    config.batch_size = 8
    config.total_steps = 2
    config.input.image_size = 32
    config.input.num_captions = 2
    config.input.max_caption_len = 8
    config.masks.min_keep = 4
    config.model.predictor_depth = 1
    config.optim.warmup_steps = 1
    config.probe.enabled = False
    config.mesh = mesh
    config.model.text_checkpoint = folder
    return config


def test_setup_refuses_before_compiling(hf_folder, tmp_path):
    folder, _ = hf_folder
    config = _config(folder)
    config.tokenizer.model_path = str(tmp_path / "other.model")
    with pytest.raises(UserError, match="brings its own tokenizer"):
        setup(config, str(tmp_path / "a"), with_data=False)
    config.tokenizer.model_path = os.path.join(folder, "spiece.model")  # the same one: fine
    assert setup(config, str(tmp_path / "b"), with_data=False).models.text.vocab_size == VOCAB
    config.model.text = "small"
    with pytest.raises(UserError, match="model.text='small'.*model.text=tiny, which matches"):
        setup(config, str(tmp_path / "c"), with_data=False)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_train_from_checkpoint(hf_folder, tmp_path, monkeypatch, scan):
    """The initial state holds the HF weights; two train steps run on them (scanned layers:
    the quicker compile)."""
    folder, _ = hf_folder
    # Unrolled: the text weights split over fsdp. Scanned: data parallel (a quicker compile).
    config = _config(folder, (("data", 8), ("fsdp", 1)) if scan else (("data", 2), ("fsdp", 4)))
    config.model.scan_layers = scan
    exp = setup(config, str(tmp_path))
    assert exp.tokenizer.model_path == os.path.join(folder, "spiece.model")
    assert exp.models.text.vocab_size == VOCAB
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(exp.models, config, tx, exp.mesh)
    state = step_lib.create_train_state(exp.models, config, tx, shardings)
    want = ckpt.load_text_params(folder, "tiny", scan=scan)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["text"]), want)
    assert scan or not state.params["text"]["shared"]["embedding"].sharding.is_fully_replicated

    def refuse(*args):
        raise AssertionError("read the checkpoint under jax.eval_shape")

    monkeypatch.setattr(ckpt, "load_text_params", refuse)  # only shapes are wanted there
    abstract = jax.eval_shape(lambda: step_lib.create_train_state(exp.models, config, tx,
                                                                  shardings))
    monkeypatch.undo()
    assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, state)
    if not scan:
        return
    step = step_lib.jit_train_step(step_lib.make_train_step(exp.models, config, tx, exp.mesh),
                                   shardings, exp.mesh)
    it = pipeline.make_train_iterator(config, exp.tokenizer, exp.models.mask_spec,
                                      source=exp.source)
    for _ in range(2):
        batch = shard_lib.make_global_batch(next(it), shard_lib.batch_sharding(exp.mesh))
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2
    # The text encoder is frozen (model.text_trainable=False): still the HF weights.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["text"]), want)
