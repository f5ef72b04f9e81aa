"""Running the configured evaluators: during training, at its end, and from a checkpoint.

    config.probe.evaluators   names of files in tcjepa_jax/evaluators/ (linear, knn, dense,
                              attentive, ...)
    config.probe.every        every K steps during training (0: only at the end)
    config.probe.encoder      "target" (the EMA encoder, I-JEPA's choice) or "context"

Results are logged as eval/<evaluator>/<task> to TensorBoard and written to
workdir/evals/step_<N>.json. At the end of training (and in `python -m tcjepa_jax.evaluate`)
the same evaluators also run on the encoder at initialisation, logged as eval_init/..., so a
number can be read against what a random encoder of the same shape gives. Evaluators that read
the trained model rather than the encoder's features (evaluators/__init__.py: grounding) get
host copies of all trained parameters (at init: the initial ones, a frozen text encoder's as
trained, since it does not change).

During training the evaluation runs on process 0 in a background thread, so the training
loop (and the other hosts, which never wait for process 0's evaluation) goes on; the encoder's
parameters are copied to host memory first, which is the only step every host joins.
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import jax
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

import ml_collections

from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax import evaluators, host_memory, optim, paths
from tcjepa_jax import step as step_lib
from tcjepa_jax.config_lib import UserError, validate_config
from tcjepa_jax.evaluators import _features
from tcjepa_jax.experiment import setup


def encoder_params(state, config):
    """The parameters of the encoder config.probe.encoder names, from a TrainState."""
    which = config.probe.get("encoder", "target")
    if which not in ("target", "context"):
        raise ValueError(f"probe.encoder={which!r}; choose 'target' or 'context'.")
    return state.ema_params if which == "target" else state.params["encoder"]


def model_params(state, config):
    """Host copies of all trained parameters when a configured evaluator reads the model,
    else None; every process must call it (as to_host)."""
    if not config.probe.enabled or not any(
            evaluators.reads_model(name) for name in config.probe.get("evaluators", ())):
        return None
    return to_host(state.params)


def to_host(tree):
    """A parameter tree as host numpy arrays; every process must call it (FSDP shards may
    live on other hosts)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


class EvalData:
    """The probe splits' images and labels, loaded once per run."""

    def __init__(self, config):
        self.config = config
        self.train = _features.load_split(config, config.probe.get("train_split", "validation"),
                                          config.probe.num_train)
        # ArrayRecord shards have no splits: the test images follow the training ones.
        skip = config.probe.num_train if _features.eval_input(config).source == "array_record" else 0
        self.test = _features.load_split(config, config.probe.get("test_split", "test"),
                                         config.probe.num_test, skip=skip)
        self.cache = {}  # the model evaluators' own held-out data and programs

    def features(self, encoder, params) -> _features.Features:
        size = self.config.probe.batch_size
        return _features.Features(_features.extract(encoder, params, self.train, size),
                                  _features.extract(encoder, params, self.test, size),
                                  encoder.patch_size)


def run_evaluators(config, encoder, params, data: EvalData, prefix: str = "eval",
                   model: evaluators.Model = None) -> dict:
    """{f"{prefix}/{evaluator}/{key}": value} of every configured evaluator; those that read
    the model are skipped without one."""
    features, results = None, {}
    for name in config.probe.get("evaluators", ("linear",)):
        module = evaluators.get(name)
        if hasattr(module, "evaluate_model"):
            found = module.evaluate_model(model, config) if model is not None else {}
        else:
            if features is None:
                features = data.features(encoder, params)
            found = module.evaluate(features, config)
        for key, value in found.items():
            results[f"{prefix}/{name}/{key}"] = float(value)
    return results


# Re-evaluations with other probe settings write here, so that the run's own evals/step_N.json
# (what the study report and the plots read) stay what training measured.
OVERRIDES_DIR = "probe_overrides"


def write_results(workdir: str, step: int, results: dict, probe_overrides=None):
    if jax.process_index() == 0:
        folder, record = os.path.join(workdir, "evals"), {"step": step, **results}
        if probe_overrides:
            folder = os.path.join(folder, OVERRIDES_DIR)
            record["probe_overrides"] = dict(probe_overrides)
        paths.write_text(os.path.join(folder, f"step_{step}.json"),
                         json.dumps(record, indent=2, sort_keys=True))


def final_evaluation(config, workdir: str, models, params, step: int, trained=None,
                     tokenizer=None, probe_overrides=None) -> dict:
    """The evaluators on `params` and on the same encoder at initialisation; `trained`
    (model_params) and `tokenizer` serve the evaluators that read the model."""
    data = EvalData(config)
    rng = step_lib.init_rng(config)
    model = init_model = None
    if trained is None:
        init = jax.jit(lambda: nn.unbox(step_lib.init_params(models, config, rng))["encoder"])()
    else:
        init_all = jax.device_get(jax.jit(
            lambda: nn.unbox(step_lib.init_params(models, config, rng)))())
        init = init_all["encoder"]
        if "text" in trained and not config.model.text_trainable:
            init_all["text"] = trained["text"]  # frozen: at init it is what it is now
        model = evaluators.Model(models, trained, tokenizer, data.cache)
        init_model = evaluators.Model(models, init_all, tokenizer, data.cache)
    results = run_evaluators(config, models.encoder, params, data, model=model)
    results.update(run_evaluators(config, models.encoder, init, data, prefix="eval_init",
                                  model=init_model))
    log_table(results)
    write_results(workdir, step, results, probe_overrides)
    return results


def log_table(results: dict):
    lines = [f"  {key[len('eval/'):]:>28s}: trained {value:.3f}   random init "
             f"{results.get('eval_init/' + key[len('eval/'):], float('nan')):.3f}"
             for key, value in sorted(results.items()) if key.startswith("eval/")]
    logging.info("Evaluation of the frozen encoder on held-out data:\n%s", "\n".join(lines))


class PeriodicEvaluator:
    """Every config.probe.every steps: copy the encoder to the host (all processes), then
    evaluate it on process 0 in a background thread; results go to `writer` and the workdir."""

    def __init__(self, config, workdir: str, models, writer, tokenizer=None):
        self.every = int(config.probe.get("every", 0)) if config.probe.enabled else 0
        self.config, self.workdir, self.models, self.writer = config, workdir, models, writer
        self.tokenizer = tokenizer
        self.lead = jax.process_index() == 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1) if self.every and self.lead else None
        self._pending = None
        self._data = None

    def maybe_run(self, step: int, state):
        if not self.every or step % self.every or step == self.config.total_steps:
            return  # the last step's evaluation is final_evaluation's
        params = to_host(encoder_params(state, self.config))
        trained = model_params(state, self.config)
        if not self.lead:
            return
        if self._pending is not None and not self._pending.done():
            logging.warning("Step %d: the evaluation of an earlier step is still running; "
                            "skipping this one (raise probe.every).", step)
            return
        self._pending = self._pool.submit(self._evaluate, step, params, trained)

    def _evaluate(self, step: int, params, trained):
        try:
            if self._data is None:
                self._data = EvalData(self.config)
            model = None if trained is None else evaluators.Model(
                self.models, trained, self.tokenizer, self._data.cache)
            results = run_evaluators(self.config, self.models.encoder, params, self._data,
                                     model=model)
            write_results(self.workdir, step, results)
            self.writer.write(step, results)  # tensorboardX queues events: thread-safe
            logging.info("step %d evaluation: %s", step, ", ".join(
                f"{k[len('eval/'):]} {v:.3f}" for k, v in sorted(results.items())))
        except Exception:  # noqa: BLE001 - an evaluator's failure must not end the training
            logging.exception("The evaluation at step %d failed; training goes on.", step)

    def close(self):
        """Waits for a running evaluation (its results are logged before the run ends)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# ---- From a checkpoint (python -m tcjepa_jax.evaluate) -----------------------------------

def restore_encoder(workdir: str, step=None, encoder=None, with_model: bool = False,
                    probe_overrides=None):
    """(config, models, step, encoder parameters) of a run's checkpoint; `with_model` appends
    (all trained parameters, tokenizer) when a configured evaluator reads the model, else
    (None, None). `probe_overrides` ({field: value} of config.probe) replace the saved
    config's probe settings, checked like a training config."""
    checkpointer = ckpt_lib.reader(workdir)
    step = ckpt_lib.existing_step(checkpointer.manager, checkpointer.directory, step)
    config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    host_memory.configure(config.get("host_malloc", "reuse"))  # as the run's trainer did
    if encoder:
        config.probe.encoder = encoder
    _override_probe(config, probe_overrides or {})
    mesh, tokenizer, models, _ = setup(config, workdir, with_data=False)
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    abstract = ckpt_lib.abstract_like(jax.eval_shape(
        lambda: step_lib.create_train_state(models, config, tx, shardings)), shardings)
    if config.probe.get("encoder", "target") == "target":
        params = checkpointer.restore_items(step, {"ema_params": abstract.ema_params})["ema_params"]
    else:
        params = checkpointer.restore_items(
            step, {"params": {"encoder": abstract.params["encoder"]}})["params"]["encoder"]
    trained = None
    if with_model and any(evaluators.reads_model(n) for n in config.probe.get("evaluators", ())):
        trained = jax.device_get(
            checkpointer.restore_items(step, {"params": abstract.params})["params"])
    checkpointer.close()
    if with_model:
        return config, models, step, params, (trained, None if trained is None else tokenizer)
    return config, models, step, params


def _override_probe(config, overrides: dict):
    if not overrides:
        return
    unknown = sorted(set(overrides) - set(config.probe))
    if unknown:
        raise UserError(f"probe overrides {unknown} are not fields of the saved config's probe "
                        f"section (it has {sorted(config.probe)}).")
    with config.unlocked():
        config.probe.update(overrides)
    try:
        validate_config(config)
    except ValueError as e:
        raise UserError(f"with the probe overrides {overrides}: {e}") from None


def evaluate_checkpoint(workdir: str, step=None, encoder=None, probe_overrides=None) -> dict:
    """The configured evaluators on a checkpoint (module docstring); `probe_overrides`
    ({field: value}, e.g. larger probe sets) write to evals/probe_overrides/step_N.json."""
    config, models, step, params, (trained, tokenizer) = restore_encoder(
        workdir, step, encoder, with_model=True, probe_overrides=probe_overrides)
    if not config.probe.get("evaluators"):
        raise UserError("config.probe.evaluators is empty: nothing to evaluate.")
    return final_evaluation(config, workdir, models, params, step, trained, tokenizer,
                            probe_overrides)
