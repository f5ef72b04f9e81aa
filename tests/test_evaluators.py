"""Evaluators and health monitors: each must separate an easy problem, give chance on shuffled
labels, and the metrics must take their known values on known inputs."""

import numpy as np
import pytest
from absl import logging

from tcjepa_jax import evaluators, monitors
from tcjepa_jax.evaluators import _features, dense, knn

import test_train

RNG = np.random.default_rng(0)


CENTRES = RNG.normal(size=(4, 16)) * 3


def _clusters(n: int, tokens: int = 8, spread: float = 0.5):
    """Tokens around one centre per class: an easy problem for any reasonable probe."""
    centres = CENTRES
    y = RNG.integers(0, len(centres), n).astype(np.int32)
    x = centres[y][:, None, :] + spread * RNG.normal(size=(n, tokens, centres.shape[1]))
    return x.astype(np.float32), y


def _features_of(x_train, y_train, x_test, y_test):
    def split(x, y):
        return _features.Split(x.mean(1), x, {"task": y}, None)
    return _features.Features(split(x_train, y_train), split(x_test, y_test), patch_size=8)


class _Probe:  # the config fields the evaluators read
    def __init__(self, **fields):
        self.fields = fields

    def get(self, name, default=None):
        return self.fields.get(name, default)


class _Config:
    def __init__(self, **probe):
        self.probe = _Probe(**probe)


@pytest.mark.parametrize("name", ["linear", "knn", "attentive"])
def test_image_level_evaluators_separate_easy_classes_and_are_at_chance_on_shuffled_labels(name):
    x_train, y_train = _clusters(400)
    x_test, y_test = _clusters(400)
    evaluator = evaluators.get(name)
    config = _Config(attentive_steps=100)
    easy = evaluator.evaluate(_features_of(x_train, y_train, x_test, y_test), config)["task"]
    # Shuffled labels on varied features (wide clusters): nothing to learn but chance. (Tight
    # clusters would make every cluster's prediction one coin flip: too noisy a check.)
    x_train, y_train = _clusters(800, spread=10.0)
    x_test, y_test = _clusters(800, spread=10.0)
    shuffled = evaluator.evaluate(
        _features_of(x_train, RNG.permutation(y_train), x_test, y_test), config)["task"]
    assert easy > 0.95, easy
    assert abs(shuffled - 0.25) < 0.1, shuffled  # 4 balanced classes


def test_feature_extraction_compiles_once_per_batch_shape():
    """Every evaluation of a run (and the probe-training and test splits, padded to one batch
    size) reuses the encoder's compiled forward pass; it used to be compiled on every call."""
    import jax
    from tcjepa_jax.models.vit import VisionTransformer
    encoder = VisionTransformer(width=16, depth=1, num_heads=2, patch_size=8)
    images = RNG.normal(size=(10, 16, 16, 3)).astype(np.float32)
    params = [encoder.init(jax.random.key(seed), images[:1])["params"] for seed in (0, 1)]
    _features.encode(encoder, params[0], images, batch_size=4)
    with test_train.traced_functions() as traced:
        pooled, tokens = _features.encode(encoder, params[1], images[:7], batch_size=4)
        _features.encode(VisionTransformer(width=16, depth=1, num_heads=2, patch_size=8),
                         params[1], images, batch_size=4)  # an equal module: the same program
    assert traced == []
    expected = np.asarray(encoder.apply({"params": params[1]}, images[:7]))
    np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled, expected.mean(1), rtol=1e-5, atol=1e-6)


def test_knn_votes_with_cosine_similarity_weights():
    x_train = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
    y_train = np.array([0, 0, 1])
    pred = knn.knn_predict(x_train, y_train, np.array([[0.2, 1.0], [1.0, 0.2]], np.float32),
                           num_classes=2, k=3, temperature=0.07)
    assert pred.tolist() == [1, 0]


def test_mean_iou_of_perfect_and_constant_predictions():
    label = RNG.integers(0, 3, (10, 16, 16))
    assert dense.mean_iou(label, label, 3) == 1.0
    constant = np.zeros_like(label)
    frequency = np.mean(label == 0)
    # Class 0: intersection = its pixels, union = all pixels; classes 1, 2: IoU 0.
    assert dense.mean_iou(constant, label, 3) == pytest.approx(frequency / 3)
    assert dense.patch_labels(np.kron(np.eye(2, dtype=np.uint8), np.ones((4, 4), np.uint8))[None],
                              4).tolist() == [[1, 0, 0, 1]]


def test_unknown_evaluator_is_named():
    with pytest.raises(ValueError, match="linear"):
        evaluators.get("lienar")
    assert {"linear", "knn", "dense", "attentive"} <= set(evaluators.available_evaluators())


def test_effective_rank_is_full_for_random_and_one_for_collapsed_features():
    random = RNG.normal(size=(4000, 32)).astype(np.float32)
    std, rank = monitors.feature_stats(random)
    assert 30 < float(rank) <= 32 and float(std) == pytest.approx(1.0, abs=0.05)
    collapsed = RNG.normal(size=(4000, 1)) * RNG.normal(size=(1, 32)) + 5.0
    _, rank = monitors.feature_stats(collapsed.astype(np.float32))
    assert float(rank) == pytest.approx(1.0, abs=0.05)
    constant = np.ones((100, 32), np.float32)
    std, rank = monitors.feature_stats(constant)
    assert float(std) == 0 and float(rank) == pytest.approx(1.0, abs=0.05)


def test_collapse_watch_warns_once_below_the_fraction(monkeypatch):
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda *args: warnings.append(args))
    watch = monitors.CollapseWatch(0.2)
    assert watch.update(1, {"monitor/target_std": 1.0, "monitor/target_rank": 50.0}) == []
    assert watch.update(2, {"monitor/target_std": 0.5, "monitor/target_rank": 20.0}) == []
    assert watch.update(3, {"monitor/target_std": 0.1, "monitor/target_rank": 20.0}) == [
        "monitor/target_std"]
    assert watch.update(4, {"monitor/target_std": 0.05, "monitor/target_rank": 5.0}) == [
        "monitor/target_rank"]
    assert len(warnings) == 2 and "collapse" in warnings[0][0]
    assert monitors.CollapseWatch(0).update(1, {"monitor/target_std": 0.0}) == []


def test_evaluators_read_any_labelled_source(tmp_path):
    """ArrayRecord shards with labels: unlabelled and unreadable records are skipped and counted,
    the test images follow the training ones, and the evaluators run on a real encoder."""
    import io

    from array_record.python.array_record_module import ArrayRecordWriter
    from PIL import Image

    from configs import synthetic_tiny
    from tcjepa_jax import evaluation, step as step_lib
    from tcjepa_jax.data import records

    def image(value):
        out = io.BytesIO()
        Image.fromarray(np.full((40, 48, 3), value, np.uint8)).save(out, format="PNG")
        return out.getvalue()

    writer = ArrayRecordWriter(str(tmp_path / "shard-00000-of-00001.array_record"), "group_size:1")
    for i in range(44):
        label = None if i == 3 else i % 2          # record 3: no label
        data = b"not an image" if i == 5 else image(40 + 4 * i)
        writer.write(records.encode_record(id=f"r{i}", image=data, captions=["a."], label=label))
    writer.close()

    config = synthetic_tiny.get_config("smoke")
    config.input.image_size = 32
    config.probe.update(source="array_record", data_dir=str(tmp_path), num_train=24,
                        num_test=16, evaluators=("linear", "knn"))
    train = _features.load_split(config, "train", 24)
    assert train["labels"]["label"].tolist() == [i % 2 for i in range(26) if i not in (3, 5)]
    assert train["skipped"] == {"no_label": 1, "undecodable_image": 1}  # counted by kind
    assert train["image"].shape == (24, 32, 32, 3) and train["segmentation"] is None
    data = evaluation.EvalData(config)
    assert data.test["labels"]["label"].tolist() == [i % 2 for i in range(26, 42)]

    models = step_lib.build_models(config, vocab_size=64)
    params = step_lib.init_params(models, config, step_lib.init_rng(config))["encoder"]
    import flax.linen as nn
    results = evaluation.run_evaluators(config, models.encoder, nn.unbox(params), data)
    assert set(results) == {"eval/linear/label", "eval/knn/label"}
    assert all(0 <= v <= 1 for v in results.values())


def test_label_variance_is_eta_squared_and_separates_a_loud_label_from_a_quiet_one():
    from tcjepa_jax.evaluators import label_variance
    rng = np.random.default_rng(3)
    n = 600
    loud, quiet = rng.integers(0, 3, n), rng.integers(0, 4, n)
    # The loud label moves a feature by 5 noise units, the quiet one by 0.2.
    x = rng.normal(size=(n, 6)) + 5.0 * np.eye(6)[loud] + 0.2 * np.eye(6)[3 + quiet % 3]
    # A numpy reference written the other way round: total minus within-class sum of squares.
    total = np.sum((x - x.mean(0)) ** 2)
    within = sum(np.sum((x[loud == c] - x[loud == c].mean(0)) ** 2) for c in range(3))
    assert label_variance.explained_share(x, loud) == pytest.approx(1 - within / total)
    assert label_variance.explained_share(x, loud) > 0.5
    assert label_variance.explained_share(x, quiet) < 0.05
    assert label_variance.explained_share(x, rng.permutation(loud)) < 0.02
    assert label_variance.effective_rank(np.eye(6)[rng.integers(0, 6, 3000)]) \
        == pytest.approx(5.0, abs=0.1)  # 6 one-hot directions, centred: rank 5, equal weights
    features = _features_of(x[:300, None], loud[:300], x[300:, None], loud[300:])
    out = label_variance.evaluate(features, None)
    assert set(out) == {"task", "effective_rank"} and 0.5 < out["task"] <= 1.0
