"""python -m tcjepa_jax.tools.plot on short real runs: a TC-JEPA run with periodic evaluations
(masks, O maps, curves) and an I-JEPA run (no O map, said so), plus the pieces that need no run."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tcjepa_jax import train as train_lib
from tcjepa_jax.config_lib import UserError, run_command
from tcjepa_jax.models import scan_params
from tcjepa_jax.tools import plot, plot_figures

import test_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)


def _train(config, workdir):
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return train_lib.train(config, workdir)
    finally:
        signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="module")
def tcjepa_run(tokenizer_path, tmp_path_factory):
    """2 steps with an evaluation after step 1 and at the end (kNN only: the cheapest)."""
    config = test_train.tiny_config(tokenizer_path)
    config.total_steps, config.checkpoint_every = 2, 2
    config.probe.enabled = True
    config.probe.every = 1
    config.probe.num_train, config.probe.num_test = 64, 32
    config.probe.evaluators = ("knn",)
    workdir = str(tmp_path_factory.mktemp("plot") / "run")
    _train(config, workdir)
    return workdir


def _check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def test_all_figures_of_a_tcjepa_run(tcjepa_run, tmp_path):
    out = str(tmp_path / "plots")
    written = plot.make_plots(tcjepa_run, out=out, num_images=4, cosine=True)
    assert set(written) == {"masks", "o_map", "o_cosine", "curves"}
    for name, path in written.items():
        assert path == os.path.join(out, f"{name}.png")
        _check_png(path)


def test_o_is_the_predictors_own(tcjepa_run):
    """The O recomputed from the sown Q and K has the predictor's own statistics, and the
    per-patch maps put every predictor token where it belongs."""
    run = plot.load_run(tcjepa_run, None, 2)
    assert run.step == 2 and run.batch["image"].shape[0] == 2
    o = plot.compute_o(run, plot.restore_params(tcjepa_run, run), 1)
    ex = {k: v[1] for k, v in run.batch.items()}
    layers, n, t, s = o.cos.shape
    k, nt = ex["target_idx"].shape
    assert o.layers == [0] and (n, s) == ex["text_mask"].shape
    assert t == k * (ex["context_idx"].shape[0] + nt)
    token_valid = np.concatenate([np.concatenate([ex["context_valid"], ex["target_valid"][b]])
                                  for b in range(k)])
    captions = ex["caption_valid"] & ex["text_mask"].any(-1)
    word = captions[:, None, None] & token_valid[None, :, None] & ex["text_mask"][:, None, :]
    rectified = np.maximum(o.cos, 0)
    np.testing.assert_allclose([r[word].mean() for r in rectified], o.aux["o_mean"], rtol=1e-5)
    np.testing.assert_allclose([(r[word] > 0).mean() for r in rectified], o.aux["o_frac_pos"],
                               rtol=1e-5)

    # Per patch: a constant per token type shows which tokens land where.
    grid = run.experiment.models.grid
    values = np.zeros((1, k, t // k, 1))
    values[:, :, ex["context_idx"].shape[0]:] = 1.0    # mask tokens 1, context tokens 0
    maps = plot_figures.patch_maps(values.reshape(1, t, 1), ex, grid[0] * grid[1])[0, :, 0]
    target = np.zeros(maps.shape, bool)
    target[ex["target_idx"][ex["target_valid"]]] = True
    context = np.zeros(maps.shape, bool)
    context[ex["context_idx"][ex["context_valid"]]] = True
    np.testing.assert_array_equal(maps[target], 1.0)
    np.testing.assert_array_equal(maps[context], 0.0)
    assert np.isnan(maps[~target & ~context]).all()


def test_unrolled_predictor_inverts_the_scanned_layout():
    """conditioning "all" (every layer scanned) and "first" (layer_0 apart, the rest scanned)."""
    def leaf(v):
        return {"kernel": np.full((2, 3), v, np.float32)}
    for conds in ((0, 1, 2), (0,)):
        tree = {"embed": leaf(-1), "norm": leaf(-2), "proj": leaf(-3)}
        for i in range(3):
            tree[f"block_{i}"] = leaf(i)
            if i in conds:
                tree[f"cond_{i}"] = {"q": leaf(10 + i)}
        back = plot.unrolled_predictor(scan_params._predictor(tree))
        jax.tree.map(np.testing.assert_array_equal, back, tree)
        assert plot.unrolled_predictor(tree) is tree


@pytest.mark.slow  # a second training run; test_all_figures_of_a_tcjepa_run covers the figures
def test_ijepa_run_skips_the_o_map_from_the_command_line(tokenizer_path, tmp_path):
    config = test_train.tiny_config(tokenizer_path)
    config.total_steps, config.checkpoint_every, config.optim.warmup_steps = 1, 1, 0
    config.model.conditioning = "none"
    workdir = str(tmp_path / "ijepa")
    _train(config, workdir)
    proc = subprocess.run(
        [sys.executable, "-m", "tcjepa_jax.tools.plot", f"--workdir={workdir}",
         "--num_images=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "o_map skipped: conditioning='none'" in proc.stdout
    out = os.path.join(workdir, "plots")
    assert sorted(os.listdir(out)) == ["curves.png", "masks.png"]
    for name in os.listdir(out):
        _check_png(os.path.join(out, name))


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint under"):
        plot.make_plots(str(tmp_path), figures=("masks",))
    with pytest.raises(UserError, match="no TensorBoard logs"):
        plot.make_plots(str(tmp_path), figures=("curves",))
    with pytest.raises(UserError, match="unknown figures"):
        plot.make_plots(str(tmp_path), figures=("pictures",))
    with pytest.raises(SystemExit, match="^error: no TensorBoard logs"):  # one line, exit 1
        run_command(plot.make_plots, str(tmp_path), None, None, ("curves",))
    assert not os.path.exists(tmp_path / "checkpoints")
