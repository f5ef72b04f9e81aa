"""Evaluate the latest checkpoint of a run with its configured probes.

    python -m tcjepa_jax.evaluate --workdir=runs/synthetic_tiny

Reads the config saved with the checkpoint, restores the target encoder and runs the linear
probes (held-out synthetic scenes) next to the same probes on the encoder at initialisation.
"""

import jax
import ml_collections
from absl import app, flags

from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax import optim
from tcjepa_jax import step as step_lib
from tcjepa_jax.config_lib import UserError, run_command
from tcjepa_jax.evaluators import linear_probe
from tcjepa_jax.experiment import setup

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.", required=True)


def evaluate(workdir: str) -> dict:
    checkpointer = ckpt_lib.Checkpointer(workdir, ml_collections.ConfigDict(
        {"checkpoint_every": 1, "keep_checkpoints": None}))
    step = checkpointer.latest_step()
    if step is None:
        raise UserError(f"no checkpoint under {checkpointer.directory}; train first "
                        f"(python -m tcjepa_jax.train --workdir={workdir}).")
    config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    mesh, _, models, _ = setup(config, workdir, with_data=False)
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    abstract = jax.eval_shape(lambda: step_lib.create_train_state(models, config, tx, shardings))
    state = checkpointer.restore_state_only(step, ckpt_lib.abstract_like(abstract, shardings))
    checkpointer.close()
    return linear_probe.probe_trained_and_init(config, workdir, models, state.ema_params)


def main(argv):
    del argv
    run_command(evaluate, _WORKDIR.value)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
