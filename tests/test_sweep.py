"""Sweeps: the axis helpers, run names, refusing bad overrides before anything runs, and a
3-run local sweep that trains to the end, tabulates its results and, re-run, starts nothing."""

import csv
import os
import sys

import pytest

from configs import common
from tcjepa_jax import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
import sweep as sweep_lib  # noqa: E402  (launch/sweep.py)


def test_product_zip_and_chain():
    grid = sweeps.product(sweeps.axis("a", [1, 2]), sweeps.axis("b.c", ["x", "y"]))
    assert grid == [{"a": 1, "b.c": "x"}, {"a": 1, "b.c": "y"},
                    {"a": 2, "b.c": "x"}, {"a": 2, "b.c": "y"}]
    zipped = sweeps.zip_(sweeps.axis("a", [1, 2]), sweeps.axis("b", [3, 4]))
    assert zipped == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    assert sweeps.chain(zipped, [{}]) == zipped + [{}]
    with pytest.raises(ValueError, match="one length"):
        sweeps.zip_(sweeps.axis("a", [1, 2]), sweeps.axis("b", [3]))
    with pytest.raises(ValueError, match="twice"):
        sweeps.product(sweeps.axis("a", [1]), sweeps.axis("a", [2]))


def test_run_names_are_stable_unique_and_readable():
    points = common.paper_sweep("sweep=mask_scales")
    names = sweeps.run_names(points)
    assert names[0] == "conditioning=all_target_scale=0.05-0.1"
    assert len(set(names)) == len(points) == 8
    assert sweeps.run_names(list(reversed(points))) == list(reversed(names))  # not positional
    clash = sweeps.run_names([{"loss.weight": 1, "model.weight": 2}])
    assert clash == ["loss.weight=1_model.weight=2"]
    assert sweeps.run_names([{}]) == ["base"]
    long = sweeps.run_names([{"model.encoder": "x" * 200}])[0]
    assert len(long) <= 80 and long == sweeps.run_names([{"model.encoder": "x" * 200}])[0]
    assert sweeps.override_flags({"masks.target_scale": (0.1, 0.2), "model.conditioning": "all"}) \
        == ["--config.masks.target_scale=(0.1, 0.2)", "--config.model.conditioning=all"]


@pytest.mark.parametrize("name", sorted(common.PAPER_SWEEPS))
def test_paper_ablations_are_valid_sweeps(name):
    base = common.paper_config("runlocal", name="x", encoder="B/16", dataset="imagenet2012",
                               epochs=1, warmup_epochs=0)
    configs = sweeps.check_sweep(base, common.paper_sweep(f"runlocal,sweep={name}"))
    assert len(configs) >= 2


def _write_config(tmp_path, points: str) -> str:
    path = tmp_path / "sweep_config.py"
    path.write_text(
        "from configs import common\n\n"
        "def get_config(arg=None):\n"
        "    config = common.paper_config('runlocal', name='tiny_sweep', encoder='B/16',\n"
        "                                 dataset='imagenet2012', epochs=1, warmup_epochs=0)\n"
        "    config.total_steps, config.log_every, config.checkpoint_every = 2, 1, 2\n"
        "    config.optim.warmup_steps = 1\n"
        "    return config\n\n"
        f"def get_sweep(arg=None):\n    return {points}\n")
    return str(path)


@pytest.mark.parametrize("points, message", [
    ("[{'optim.lr_peek': 1e-3}]", "no field 'optim.lr_peek'. Did you mean optim.lr_peak"),
    ("[{'optm.lr_peak': 1e-3}]", "no field 'optm'"),
    ("[{'model.conditioning': 'sometimes'}]", "model.conditioning='sometimes'"),
    ("[{'batch_size': 'big'}]", "batch_size='big'"),
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, capsys, points, message):
    config = _write_config(tmp_path, points)
    with pytest.raises(SystemExit) as exit_info:
        sweep_lib.main([f"--config={config}", f"--root={tmp_path / 'runs'}"])
    assert message in str(exit_info.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow
def test_local_sweep_runs_to_the_end_and_a_rerun_starts_nothing(tmp_path, capsys, monkeypatch):
    # The runs share one XLA cache: they differ only in the seed, which is not in the program.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla_cache"))
    config = _write_config(tmp_path, "[{'seed': s} for s in (0, 1, 2)]")
    root = tmp_path / "runs"
    argv = [f"--config={config}", f"--root={root}", "--max_parallel=1"]
    assert sweep_lib.main(argv) == 0
    out = capsys.readouterr().out
    names = ["seed=0", "seed=1", "seed=2"]
    for name in names:
        assert os.path.exists(root / name / "final_metrics.json"), out
        assert f"[{name}] started" in out
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names
    assert all(r["step"] == "2" and float(r["loss"]) > 0 for r in rows)
    assert len({r["loss"] for r in rows}) == 3  # three seeds, three runs
    assert "| seed=1 | 1 | 2 |" in (root / "results.md").read_text()

    stamps = [os.path.getmtime(root / n / "final_metrics.json") for n in names]
    assert sweep_lib.main(argv) == 0
    out = capsys.readouterr().out
    assert "started" not in out and out.count("finished already: skipped") == 3
    assert stamps == [os.path.getmtime(root / n / "final_metrics.json") for n in names]


def test_tpu_sweep_dry_run_prints_one_pod_job_per_run(capfd):
    root = "gs://my-bucket/sweeps/b16"
    code = sweep_lib.main([
        "--config=configs/in1k_vit_b16.py:sweep=penalties", "--launcher=tpu", f"--root={root}",
        "--dry-run", "--launcher_args=--zone=us-east5-a --project=my-proj --tpu=v5p:2x2x1",
        "--", "--config.log_every=10"])
    out = capfd.readouterr().out
    assert code == 0
    jobs = [line for line in out.splitlines() if "launch/tpu.py run --no_follow" in line]
    assert len(jobs) == 4, out
    assert "--name=in1k-vit-b16-sparse-weight-0-0-consistency-weight-0-0" in jobs[0]
    assert (f"--workdir={root}/sparse_weight=0.0_consistency_weight=0.0" in jobs[0]
            and jobs[0].endswith("-- --config.log_every=10 --config.loss.sparse_weight=0.0 "
                                 "--config.loss.consistency_weight=0.0"))
    # The TPU launcher's own dry run follows each job: the gcloud commands of one pod job.
    assert out.count("gcloud compute tpus tpu-vm create") == 4
    assert "--accelerator-type=v5p-8" in out


def test_tpu_sweep_needs_a_bucket(tmp_path):
    with pytest.raises(SystemExit, match="gs://"):
        sweep_lib.main(["--config=configs/in1k_vit_b16.py", "--launcher=tpu",
                        f"--root={tmp_path}", "--dry-run"])
