"""model.text_features="precomputed": make_dataset --text_checkpoint stores the frozen T5's word
features with the records, the pipeline emits them, and the step uses them instead of T5.

A tiny T5 v1.1 checkpoint in Hugging Face's layout is written from our own randomly initialised
T5Encoder (safetensors; no torch needed), with a SentencePiece model trained on the synthetic
captions. The same images and captions go through make_dataset twice (features in bfloat16 and
in float32). Then: the stored features are T5's on each sentence alone; the loss on a pipeline
batch is the loss of the step that computes T5 itself, with the same weights and batch (float32
storage: to float rounding; bfloat16 storage: within the rounding of the features, below); the
state has no T5; a config that names another T5 or length, and records without (fitting)
features, are refused or skipped and counted.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

from configs import synthetic_tiny  # noqa: E402
from tcjepa_jax import optim  # noqa: E402
from tcjepa_jax import step as step_lib  # noqa: E402
from tcjepa_jax.config_lib import UserError, validate_config  # noqa: E402
from tcjepa_jax.data import pipeline, records, synthetic  # noqa: E402
from tcjepa_jax.data import text_features as text_lib  # noqa: E402
from tcjepa_jax.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from tcjepa_jax.experiment import setup  # noqa: E402
from tcjepa_jax.models import t5_checkpoint  # noqa: E402
from tcjepa_jax.models.text import T5_SIZES, T5Encoder  # noqa: E402
from tcjepa_jax.tools.dataset_inputs import InputError  # noqa: E402
from tcjepa_jax.tools.dataset_writer import write_dataset  # noqa: E402

VOCAB = 256            # rows of the checkpoint's embedding table (the tokenizer has <= 200)
TINY = T5_SIZES["tiny"]
S, N, IMAGES = 16, 3, 10


def write_t5_folder(folder, spiece: str, seed: int) -> str:
    """Our T5Encoder's random parameters saved as HF's T5EncoderModel.save_pretrained would."""
    os.makedirs(folder, exist_ok=True)
    params = nn.unbox(T5Encoder(vocab_size=VOCAB, **TINY).init(
        jax.random.key(seed), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))["params"])
    params = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(seed)
    tensors = {"shared.weight": params["shared"]["embedding"],
               "encoder.final_layer_norm.weight": 1 + 0.3 * rng.normal(size=TINY["width"]),
               "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                   params["relative_attention_bias"]}
    width = TINY["width"]
    for i in range(TINY["depth"]):
        block, p = params[f"block_{i}"], f"encoder.block.{i}.layer."
        for n in "qkv":
            tensors[f"{p}0.SelfAttention.{n}.weight"] = \
                block["attention"][n]["kernel"].reshape(width, -1).T
        tensors[f"{p}0.SelfAttention.o.weight"] = \
            block["attention"]["o"]["kernel"].reshape(-1, width).T
        for n in ("wi_0", "wi_1", "wo"):
            tensors[f"{p}1.DenseReluDense.{n}.weight"] = block["mlp"][n]["kernel"].T
        for j in (0, 1):  # norms that matter (HF initialises them to 1)
            tensors[f"{p}{j}.layer_norm.weight"] = 1 + 0.3 * rng.normal(size=width)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              os.path.join(folder, "model.safetensors"))
    config = {"model_type": "t5", "vocab_size": VOCAB, "d_model": width,
              "num_layers": TINY["depth"], "num_heads": TINY["num_heads"],
              "d_kv": TINY["head_dim"], "d_ff": TINY["mlp_dim"],
              "feed_forward_proj": "gated-gelu"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(spiece, "rb") as src, open(os.path.join(folder, "spiece.model"), "wb") as dst:
        dst.write(src.read())
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two T5 checkpoints of one tokenizer, an image folder with captions, and its datasets:
    without features, with bfloat16 and with float32 features (of checkpoint "t5")."""
    root = tmp_path_factory.mktemp("precomputed")
    spiece = train_tokenizer(synthetic.iter_captions(0, 300), str(root / "spm"), 200)
    t5 = write_t5_folder(root / "t5", spiece, seed=0)
    other = write_t5_folder(root / "other_t5", spiece, seed=1)
    images, lines = root / "images", []
    images.mkdir()
    long = list(synthetic.iter_captions(1, IMAGES))  # longer than S tokens: cut as in training
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(images / f"{i}.png")
        caps = [f"a red ball number {i}.", "a cube.", long[i], f"{i} blue cones."][:1 + i % 4]
        lines.append(json.dumps({"id": f"{i}.png", "captions": caps}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    common = dict(images=str(images), captions=str(root / "captions.jsonl"), shard_size=4,
                  workers=1)
    out = {"t5": t5, "other_t5": other, "plain": str(root / "plain"), "common": common}
    write_dataset(out["plain"], **common)
    for dtype in text_lib.DTYPES:
        out[dtype] = str(root / dtype)
        write_dataset(out[dtype], **common, text_checkpoint=t5, text="tiny", max_caption_len=S,
                      text_features_dtype=dtype)
    return out


def read_records(out: str) -> list:
    import grain  # pylint: disable=import-outside-toplevel
    with open(os.path.join(out, "manifest.json")) as f:
        shards = [os.path.join(out, s["name"]) for s in json.load(f)["shards"]]
    source = grain.sources.ArrayRecordDataSource(shards)
    return [records.decode_record(source[i]) for i in range(len(source))]


def test_dataset_round_trip(data):
    tokenizer = Tokenizer(os.path.join(data["t5"], "spiece.model"))
    model = T5Encoder(vocab_size=VOCAB, **TINY)
    params = t5_checkpoint.load_text_params(data["t5"], "tiny")
    stored = {}
    for dtype in text_lib.DTYPES:
        with open(os.path.join(data[dtype], "manifest.json")) as f:
            meta = json.load(f)["text_features"]
        assert meta["text"] == "tiny" and meta["max_caption_len"] == S
        assert meta["dtype"] == dtype and meta["width"] == TINY["width"]
        assert meta["fingerprint"] == text_lib.fingerprint(data["t5"])
        assert meta["fingerprint"] != text_lib.fingerprint(data["other_t5"])
        assert meta["sentences_at_max_len"] > 0  # the long captions were cut to S
        rs = read_records(data[dtype])
        assert len(rs) == IMAGES and all("text_features" not in r
                                         for r in read_records(data["plain"]))
        tokens = 0
        for r in rs:
            features = text_lib.unpack(r["text_features"])
            ids, mask = tokenizer.encode(r["captions"], S)
            assert [f.shape for f in features] == [(int(m.sum()), TINY["width"]) for m in mask]
            tokens += int(mask.sum())
            stored[dtype, r["id"]] = features
            if dtype == "float32":  # T5 on each sentence alone, padded to S as in the step
                ref = np.asarray(model.apply({"params": params}, ids, mask))
                for f, want, m in zip(features, ref, mask):
                    np.testing.assert_allclose(f, want[m], rtol=1e-5, atol=1e-5)
        itemsize = 2 if dtype == "bfloat16" else 4
        assert meta["tokens"] == tokens and meta["bytes"] == tokens * TINY["width"] * itemsize
    for (dtype, key), features in stored.items():
        if dtype == "bfloat16":  # the float32 features, rounded
            for f, f32 in zip(features, stored["float32", key]):
                np.testing.assert_allclose(f.astype(np.float32), f32, rtol=2 ** -8, atol=1e-6)
    # Other text flags into the same folder: refused before T5 is even loaded.
    with pytest.raises(InputError, match=r"different arguments: --max_caption_len=16 \(now 8\)"):
        write_dataset(data["bfloat16"], **data["common"], text_checkpoint=data["t5"],
                      text="tiny", max_caption_len=8)


def config_for(data, dataset: str, **model) -> ml_collections.ConfigDict:
    config = synthetic_tiny.get_config("smoke")
    config.batch_size = 8                 # one example per (fake) device of the default mesh
    config.input.source = "array_record"
    config.input.data_dir = data[dataset]
    config.input.image_size = 32          # a 4x4 grid of 8 px patches
    config.input.num_captions = N
    config.input.max_caption_len = S
    config.masks.min_keep = 4
    config.masks.max_context = 0
    config.model.predictor_width = 24
    config.model.predictor_heads = 2
    config.model.predictor_depth = 1
    config.model.text_checkpoint = data["t5"]
    config.model.text_features = "precomputed"
    config.monitor.enabled = False        # a smaller program to compile
    config.probe.enabled = False
    config.model.update(model)
    return config


def first_batch(config) -> tuple:
    exp = setup(config, "unused")
    it = pipeline.make_train_iterator(config, exp.tokenizer, exp.models.mask_spec,
                                      source=exp.source)
    return exp, next(it)


_LOSS = {}


def loss_and_grads(models, config, params, batch):
    key = config.model.text_features
    if key not in _LOSS:
        _LOSS[key] = jax.jit(jax.value_and_grad(
            lambda p, b: step_lib.loss_fn(p, p["encoder"], b, models, config), has_aux=True))
    (loss, metrics), grads = _LOSS[key](params, jax.tree.map(jnp.asarray, batch))
    return float(loss), jax.device_get(metrics), jax.device_get(grads)


# float32 storage is the exactness check (default run); bfloat16 the rounding bound (slow).
@pytest.mark.parametrize("dtype", [pytest.param(d, marks=pytest.mark.slow) if d == "bfloat16"
                                   else d for d in text_lib.DTYPES])
def test_precomputed_loss_equals_computed(data, dtype):
    config = config_for(data, dtype)
    exp, batch = first_batch(config)
    features = batch["text_features"]
    assert features.shape == (8, N, S, TINY["width"]) and features.dtype == text_lib.DTYPES[dtype]
    assert not np.any(features[~batch["text_mask"]]) and np.all(np.any(
        features[batch["text_mask"] & batch["caption_valid"][..., None]] != 0, -1))
    assert not batch["caption_valid"].all()  # some images have fewer than N captions

    # No T5 in the model state: parameters, optimizer state.
    models = exp.models
    assert models.text_precomputed
    params = nn.unbox(step_lib.init_params(models, config, jax.random.key(0)))
    assert set(params) == {"encoder", "predictor"}
    assert "text" not in str(jax.eval_shape(optim.make_optimizer(config).init, params))

    # The step that runs T5 itself, with the checkpoint's weights, on the same batch.
    computed = config_for(data, dtype, text_features="compute")
    validate_config(computed)
    models_c = step_lib.build_models(computed, VOCAB)
    params_c = dict(params, text=t5_checkpoint.load_text_params(data["t5"], "tiny"))
    text = step_lib.text_features(models_c, params_c, jax.tree.map(jnp.asarray, batch), False)
    valid = batch["text_mask"] & batch["caption_valid"][..., None]
    err = np.abs(np.asarray(text)[valid] - features[valid].astype(np.float32))
    scale = np.abs(np.asarray(text)[valid]).max()
    print(f"{dtype}: max |stored - computed| = {err.max():.2e} (features up to {scale:.2f})")

    loss_p, metrics_p, grads_p = loss_and_grads(models, config, params, batch)
    loss_c, metrics_c, grads_c = loss_and_grads(models_c, computed, params_c, batch)
    print(f"{dtype}: loss {loss_p:.7f} precomputed, {loss_c:.7f} computed "
          f"(relative difference {abs(loss_p - loss_c) / loss_c:.1e})")
    if dtype == "float32":  # the same numbers, computed on other batch shapes
        assert err.max() <= 1e-5 * scale
        tol = dict(rtol=1e-5, atol=1e-6)
    else:
        # bfloat16 keeps 8 significant bits: rounding moves each feature by at most 2^-8 of its
        # size. Through the conditioners that moves the loss and its gradients by a fraction
        # of that.
        assert np.all(err <= 2 ** -8 * np.abs(np.asarray(text)[valid]) + 1e-6)
        tol = dict(rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(loss_p, loss_c, **tol)
    for name in metrics_c:
        np.testing.assert_allclose(metrics_p[name], metrics_c[name], err_msg=name, **tol)
    # Gradients, relative to each network's gradient norm (entries near zero, e.g. of the
    # attention keys' bias, make entry-wise relative tests meaningless).
    for part in ("encoder", "predictor"):
        a, b = (np.concatenate([x.ravel() for x in jax.tree.leaves(g[part])])
                for g in (grads_p, grads_c))
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        print(f"{dtype}: {part} gradient, relative difference {rel:.1e}")
        assert rel <= (1e-5 if dtype == "float32" else 1e-2), part


def test_config_and_data_mismatches_are_refused(data):
    cases = [
        (dict(dataset="bfloat16", input=dict(max_caption_len=12)),
         r"input.max_caption_len=12, but their captions were cut to 16 tokens "
         r"\(--max_caption_len\)"),
        (dict(dataset="bfloat16", model=dict(text_checkpoint=data["other_t5"])),
         r"other_t5' holds other weights than '.*/t5', which made them \(--text_checkpoint\)"),
        (dict(dataset="plain"), "have no text features"),
    ]
    for case, message in cases:
        config = config_for(data, case["dataset"], **case.get("model", {}))
        config.input.update(case.get("input", {}))
        with pytest.raises(UserError, match=message):
            setup(config, "unused")
    # Fields against each other, before anything is read.
    for change, message in [(dict(source="synthetic"), "input.source='synthetic' has none"),
                            (dict(caption_file="c.jsonl"), "replaces those"),
                            (dict(text_checkpoint=""), "set model.text_checkpoint"),
                            (dict(text_trainable=True), "model.text_trainable=True")]:
        config = config_for(data, "bfloat16")
        for key, value in change.items():
            (config.input if key in config.input else config.model)[key] = value
        with pytest.raises(ValueError, match=message):
            validate_config(config)


def test_bad_records_are_skipped_and_counted(data):
    config = config_for(data, "bfloat16")
    exp = setup(config, "unused")
    good = read_records(data["bfloat16"])
    with_captions = [r for r in good if len(r["captions"]) >= 2]
    missing = dict(with_captions[0])
    del missing["text_features"]
    swapped = dict(with_captions[1], captions=with_captions[1]["captions"][::-1] + ["new one."])
    source = [good[0], missing, swapped]
    example = pipeline.TrainExample(source, config, exp.tokenizer, exp.models.mask_spec, 0, 1)
    assert example(0, 0)["text_features"].shape == (N, S, TINY["width"])
    assert example(1, 1)["skipped"] == "missing_text_features"
    assert example(2, 2)["skipped"] == "bad_text_features"
    # Through the iterator: batches stay full, the bad ones are counted by kind.
    it = pipeline.make_train_iterator(config, exp.tokenizer, exp.models.mask_spec,
                                      source=source * 8)
    batch = next(it)
    assert batch["text_features"].shape[0] == 8
    assert it.counter.skipped["missing_text_features"] > 0
    assert it.counter.skipped["bad_text_features"] > 0
