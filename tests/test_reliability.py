"""Restarts that must not lose or silently change a run (docs/reliability.md): damaged and
incomplete checkpoints, changed configs, other meshes, another number of hosts, init_from,
retention and failed saves.

One tiny TC-JEPA run (test_train's config, a checkpoint every step) is trained once; each test
copies its workdir, damages or changes something, and resumes through resume.resume_or_start,
the function train.train starts with.
"""

import json
import logging
import os
import shutil
import signal
import time

import grain
import jax
import ml_collections
import numpy as np
import pytest

import test_train
from test_train import TOTAL_STEPS, Setup, tiny_config, tokenizer_path  # noqa: F401 (fixture)
from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax import resume
from tcjepa_jax import train as train_lib
from tcjepa_jax.config_lib import UserError
from tcjepa_jax.data import pipeline
from tcjepa_jax.data.tokenizer import Tokenizer


# ---- One finished run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer_path):  # noqa: F811
    config = tiny_config(tokenizer_path)
    config.checkpoint_every = 1
    config.keep_checkpoints = 10
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        train_lib.train(config, workdir)
    finally:
        signal.signal(signal.SIGTERM, handler)
    setup = Setup(config)
    states = {step: _restore_state(workdir, setup, step) for step in (TOTAL_STEPS - 1, TOTAL_STEPS)}
    return workdir, config, setup, states


def _restore_state(workdir, setup, step):
    checkpointer = ckpt_lib.Checkpointer(workdir, setup.config)
    try:
        return jax.device_get(checkpointer.restore(step, setup.abstract_state()))
    finally:
        checkpointer.close()


def _copy(finished, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(finished[0], workdir)
    return workdir


def _make_iterator(config, setup, process_index=0, process_count=1):
    tokenizer = Tokenizer(config.tokenizer.model_path)
    return lambda start: pipeline.make_train_iterator(
        config, tokenizer, setup.models.mask_spec, start=start, process_index=process_index,
        process_count=process_count)


def _resume(workdir, config, setup, allow=False):
    checkpointer = ckpt_lib.Checkpointer(workdir, config)

    def from_scratch():
        raise AssertionError("started from step 0 next to checkpoints")
    try:
        return resume.resume_or_start(
            checkpointer, config, abstract_state=setup.abstract_state(), new_state=from_scratch,
            make_iterator=_make_iterator(config, setup), allow_config_change=allow)
    finally:
        checkpointer.close()


def _assert_trees_equal(a, b):
    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                                 jax.tree_util.tree_flatten_with_path(b)[0]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


def _fresh_batch(config, setup, index):
    """Batch `index` (0-based) of an uninterrupted single-host stream."""
    it = _make_iterator(config, setup)(0)
    for _ in range(index):
        next(it)
    return next(it)


# ---- Damaged and incomplete checkpoints ----------------------------------------------------

def _state_files(step_dir):
    return sorted(os.path.join(root, f) for root, _, files in os.walk(os.path.join(step_dir, "state"))
                  for f in files if os.sep + "d" + os.sep in os.path.join(root, f))


def _truncate(step_dir):
    for f in _state_files(step_dir):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _delete_array_files(step_dir):
    for f in _state_files(step_dir):
        os.remove(f)


def _delete_data_file(step_dir):
    os.remove(os.path.join(step_dir, "data", "process_0-of-1.json"))


def _garble_config(step_dir):
    with open(os.path.join(step_dir, "config", "metadata"), "w") as f:
        f.write("{not json")


@pytest.mark.parametrize("damage", [_truncate, _delete_array_files, _delete_data_file,
                                    _garble_config])
def test_damaged_newest_checkpoint_resumes_from_the_previous(finished, tmp_path, caplog, damage):
    workdir, config, setup, states = finished
    workdir = _copy(finished, tmp_path)
    damage(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS)))
    with caplog.at_level(logging.WARNING):
        start = _resume(workdir, config, setup)
    assert start.step == TOTAL_STEPS - 1
    _assert_trees_equal(jax.device_get(start.state), states[TOTAL_STEPS - 1])
    # The data continues after step TOTAL_STEPS - 1's batches.
    np.testing.assert_array_equal(next(start.data_iter)["image"],
                                  _fresh_batch(config, setup, TOTAL_STEPS - 1)["image"])
    # Said which and why, and moved out of the way of the step that will be saved again.
    assert f"Checkpoint {TOTAL_STEPS} " in caplog.text
    assert f"Resumed from step {TOTAL_STEPS - 1}" in caplog.text
    assert not os.path.exists(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS)))
    moved = os.listdir(os.path.join(workdir, "damaged_checkpoints"))
    assert [m.split(".")[0] for m in moved] == [str(TOTAL_STEPS)]


def test_checkpoint_killed_mid_save_is_ignored(finished, tmp_path):
    """Orbax writes into STEP.orbax-checkpoint-tmp and renames when complete: a save killed
    half-way leaves only the temporary directory, which is not a checkpoint."""
    workdir, config, setup, states = finished
    workdir = _copy(finished, tmp_path)
    ckpts = os.path.join(workdir, "checkpoints")
    os.rename(os.path.join(ckpts, str(TOTAL_STEPS)),
              os.path.join(ckpts, f"{TOTAL_STEPS}.orbax-checkpoint-tmp-1234"))
    start = _resume(workdir, config, setup)
    assert start.step == TOTAL_STEPS - 1
    _assert_trees_equal(jax.device_get(start.state), states[TOTAL_STEPS - 1])


def test_readers_leave_a_save_in_progress_alone(finished, tmp_path):
    """evaluate, plot and init_from may open a run that is still training: unlike the
    trainer's own Checkpointer, they must not clean up the temporary directory of its save."""
    workdir = _copy(finished, tmp_path)
    in_progress = os.path.join(workdir, "checkpoints",
                               f"{TOTAL_STEPS + 1}.orbax-checkpoint-tmp-1234")
    os.makedirs(in_progress)
    reader = ckpt_lib.reader(workdir)
    time.sleep(1.0)  # Orbax's clean-up runs in a background thread as the manager opens
    assert TOTAL_STEPS in reader.manager.all_steps()
    reader.close()
    assert os.path.isdir(in_progress)


def test_no_readable_checkpoint_stops_instead_of_starting_over(finished, tmp_path):
    workdir, config, setup, _ = finished
    workdir = _copy(finished, tmp_path)
    for step in range(1, TOTAL_STEPS + 1):
        _delete_array_files(os.path.join(workdir, "checkpoints", str(step)))
    with pytest.raises(UserError, match="none can be read") as info:
        _resume(workdir, config, setup)
    assert "Not starting from step 0" in str(info.value)
    assert str(TOTAL_STEPS) in str(info.value)
    assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))  # nothing moved


# ---- Changed experiments ----------------------------------------------------------------

def test_changed_experiment_is_refused_unless_allowed(finished, tmp_path, caplog):
    workdir, config, setup, states = finished
    workdir = _copy(finished, tmp_path)
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.optim.lr_peak = 2 * config.optim.lr_peak
    changed.masks.target_scale = (0.1, 0.2)
    changed.log_every = 7                       # logging: allowed
    with pytest.raises(UserError) as info:
        _resume(workdir, changed, setup)
    message = str(info.value)
    assert "optim.lr_peak" in message and "masks.target_scale" in message
    assert "log_every" not in message
    assert "--allow_config_change" in message

    with caplog.at_level(logging.INFO):
        start = _resume(workdir, changed, setup, allow=True)
    assert start.step == TOTAL_STEPS
    assert "allow_config_change" in caplog.text and "optim.lr_peak" in caplog.text

    # A checkpoint from before a field existed: the field had its default, so no change.
    older = ml_collections.ConfigDict(config.to_dict())
    del older.model["cond_mlp"]
    experiment, _ = resume.config_changes(json.loads(older.to_json()), config)
    assert experiment == {}
    experiment, _ = resume.config_changes(json.loads(older.to_json()), changed_mlp(config))
    assert list(experiment) == ["model.cond_mlp"]

    harmless = ml_collections.ConfigDict(config.to_dict())
    harmless.log_every, harmless.checkpoint_every = 2, 5
    harmless.probe.evaluators = ("linear",)
    harmless.mesh = (("data", 1), ("fsdp", 8))
    assert _resume(workdir, harmless, setup).step == TOTAL_STEPS


def changed_mlp(config):
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.model.cond_mlp = "after_pool"
    return changed


# ---- Other meshes and another number of hosts ---------------------------------------------

MESHES = {  # name: (mesh, number of devices)
    "fsdp4": ((("data", 1), ("fsdp", 4)), 4),
    "dp2_fsdp2_tp2": ((("data", 2), ("fsdp", 2), ("tensor", 2)), 8),
    "tp4": ((("data", 2), ("fsdp", 1), ("tensor", 4)), 8),
    "one": ((("data", 1), ("fsdp", 1)), 1),
}


def test_restore_across_meshes(finished, tmp_path):
    """8 devices (data 2 x fsdp 4) -> 4 -> 1, and across data / fsdp / tensor layouts, each
    restore exact and laid out on the new mesh, the data position with it."""
    workdir, config, _, states = finished
    chain = ["fsdp4", "one"]              # saved on 8, restored on 4, saved there, restored on 1
    for name in ["dp2_fsdp2_tp2", "tp4"] + chain:
        mesh, count = MESHES[name]
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.mesh = mesh
        setup = Setup(cfg, devices=jax.devices()[:count])
        start = _resume(workdir, cfg, setup)
        assert start.step == TOTAL_STEPS
        leaf = start.state.params["encoder"]["patch_embed"]["kernel"]
        assert leaf.sharding.mesh.devices.size == count, name
        _assert_trees_equal(jax.device_get(start.state), states[TOTAL_STEPS])
        np.testing.assert_array_equal(next(start.data_iter)["image"],
                                      _fresh_batch(config, setup, TOTAL_STEPS)["image"])
        if name == "fsdp4":  # save from the 4-device mesh; the next restore reads this one
            start = _resume(workdir, cfg, setup)
            workdir = str(tmp_path / "saved_on_4")
            checkpointer = ckpt_lib.Checkpointer(workdir, cfg)
            checkpointer.save(TOTAL_STEPS, start.state, start.data_iter, cfg, force=True)
            checkpointer.wait()
            checkpointer.close()


def test_data_position_rederived_for_another_host_count(finished):
    """Two hosts' streams together are the one-host stream; continuing at the sum of the
    records they read gives the one-host (and four-host) stream's next batch exactly."""
    _, config, setup, _ = finished
    steps, batch = 2, config.batch_size
    one = _make_iterator(config, setup)(0)
    one_batches = [next(one)["image"] for _ in range(steps + 1)]
    two = [_make_iterator(config, setup, i, 2)(0) for i in range(2)]
    for k in range(steps):
        halves = [next(it)["image"] for it in two]
        np.testing.assert_array_equal(one_batches[k][0::2], halves[0])
        np.testing.assert_array_equal(one_batches[k][1::2], halves[1])
    states = {(i, 2): it.get_state() for i, it in enumerate(two)}
    start, counts = resume.rederive_data_start(states, 2)
    assert start == steps * batch and counts["seen"] == steps * batch
    np.testing.assert_array_equal(next(_make_iterator(config, setup)(start))["image"],
                                  one_batches[steps])
    for i in range(4):
        quarter = next(_make_iterator(config, setup, i, 4)(start))["image"]
        np.testing.assert_array_equal(quarter, one_batches[steps][i::4])
    with pytest.raises(ValueError, match="hosts \\[1\\] of 2 are missing"):
        resume.rederive_data_start({(0, 2): states[(0, 2)]}, 2)


def test_resume_from_a_checkpoint_of_two_hosts(finished, tmp_path, caplog):
    """The finished one-host checkpoint rewritten as if two hosts had written it."""
    workdir, config, setup, states = finished
    workdir = _copy(finished, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS))
    data_dir = os.path.join(step_dir, "data")
    with open(os.path.join(data_dir, "process_0-of-1.json")) as f:
        state = json.load(f)
    os.remove(os.path.join(data_dir, "process_0-of-1.json"))
    seen = state["counts"]["seen"]
    for i in range(2):
        half = dict(state, counts=dict(state["counts"], seen=seen // 2))
        with open(os.path.join(data_dir, f"process_{i}-of-2.json"), "w") as f:
            json.dump(half, f)
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        json.dump({"process_count": 2, "data_start": 0}, f)
    with caplog.at_level(logging.WARNING):
        start = _resume(workdir, config, setup)
    assert start.step == TOTAL_STEPS and start.data_start == TOTAL_STEPS * config.batch_size
    assert "written by 2 hosts" in caplog.text
    _assert_trees_equal(jax.device_get(start.state), states[TOTAL_STEPS])
    np.testing.assert_array_equal(next(start.data_iter)["image"],
                                  _fresh_batch(config, setup, TOTAL_STEPS)["image"])


# ---- init_from --------------------------------------------------------------------------------

def test_init_from_another_run(finished, tmp_path):
    workdir, config, setup, states = finished
    source = states[TOTAL_STEPS]
    for predictor in (False, True):
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.init_from.workdir, cfg.init_from.predictor = workdir, predictor
        checkpointer = ckpt_lib.Checkpointer(str(tmp_path / f"new{predictor}"), cfg)
        fresh = jax.device_get(test_train.step_lib.create_train_state(
            setup.models, cfg, setup.tx, setup.shardings))
        start = resume.resume_or_start(
            checkpointer, cfg, abstract_state=setup.abstract_state(),
            new_state=lambda: test_train.step_lib.create_train_state(
                setup.models, cfg, setup.tx, setup.shardings),
            make_iterator=_make_iterator(cfg, setup))
        checkpointer.close()
        state = jax.device_get(start.state)
        assert start.step == 0 and int(state.step) == 0
        _assert_trees_equal(state.params["encoder"], source.params["encoder"])
        _assert_trees_equal(state.ema_params, source.ema_params)
        _assert_trees_equal(state.opt_state, fresh.opt_state)
        _assert_trees_equal(state.params["predictor"],
                            (source if predictor else fresh).params["predictor"])

    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.init_from.workdir = workdir
    cfg.model.encoder = "mu/4"
    other = Setup(cfg)
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "mismatch"), cfg)
    with pytest.raises(UserError, match="init_from.*does not match"):
        resume.resume_or_start(
            checkpointer, cfg, abstract_state=other.abstract_state(),
            new_state=lambda: test_train.step_lib.create_train_state(
                other.models, cfg, other.tx, other.shardings),
            make_iterator=_make_iterator(cfg, other))


# ---- Retention and failed saves ----------------------------------------------------------

def _tiny_checkpointer(directory, **fields):
    config = ml_collections.ConfigDict(
        {"checkpoint_every": 1, "keep_checkpoints": 2, "keep_period": 0, **fields})
    return ckpt_lib.Checkpointer(str(directory), config), config


def test_retention_keeps_the_last_n_and_every_mth(tmp_path):
    checkpointer, config = _tiny_checkpointer(tmp_path, keep_period=4)
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in range(1, 10):
        checkpointer.save(step, {"w": np.full(3, step, np.float32)}, data, config)
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 8, 9]
    checkpointer.close()


def test_small_replicated_arrays_are_saved_without_slicing(tmp_path):
    """Orbax's replica-parallel save slices each replicated array with a program compiled per
    shape; below ckpt_lib.REPLICA_PARALLEL_MIN_BYTES per replica it must not (a tiny train state
    compiled ~40 slices per save), while a large array is still split among the replicas."""
    checkpointer, config = _tiny_checkpointer(tmp_path)
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    replicated = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)),
                                            jax.sharding.PartitionSpec())
    # Like a train state's biases and norms: an axis the 8 replicas could split, but small.
    small = {f"w{n}": jax.device_put(np.ones((8 * n, 3), np.float32), replicated)
             for n in range(1, 6)}
    with test_train.traced_functions() as traced:
        checkpointer.save(1, small, data, config)
        checkpointer.wait()
    assert "slice" not in traced
    # A shape no other test saves, so its slicing program is traced here.
    large = np.zeros((8, ckpt_lib.REPLICA_PARALLEL_MIN_BYTES // 4 + 1), np.float32)
    with test_train.traced_functions() as traced:
        checkpointer.save(2, {"big": jax.device_put(large, replicated)}, data, config)
        checkpointer.wait()
    assert "slice" in traced, "a large replicated array is no longer split among its replicas"
    checkpointer.close()


def test_failed_save_stops_with_a_clear_message(tmp_path, monkeypatch):
    # Orbax waits for the lost "directory created" signal for its coordination timeout (300 s)
    # before the save fails; a run pays that once, the test need not.
    from orbax.checkpoint._src.multihost import multihost
    monkeypatch.setattr(multihost, "_DEFAULT_BARRIER_TIMEOUT", 5)
    checkpointer, config = _tiny_checkpointer(tmp_path)
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    checkpointer.save(1, {"w": np.zeros(3, np.float32)}, data, config)
    checkpointer.wait()
    # The checkpoints directory becomes unwritable (a file where the directory was; root
    # cannot write into it either).
    shutil.rmtree(checkpointer.directory)
    with open(checkpointer.directory, "w") as f:
        f.write("not a directory")
    with pytest.raises(ckpt_lib.CheckpointError, match="saving a checkpoint .* failed") as info:
        checkpointer.save(2, {"w": np.ones(3, np.float32)}, data, config)
        checkpointer.wait()
    assert "stops instead of training on without checkpoints" in str(info.value)
