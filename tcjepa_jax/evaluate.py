"""Evaluate a run's checkpoint with its configured evaluators.

    python -m tcjepa_jax.evaluate --workdir=runs/synthetic_tiny [--step=N] [--encoder=target|context]

Reads the config saved with the checkpoint, restores only the encoder it evaluates (not the
optimizer state or the other encoder), and runs config.probe.evaluators next to the same
evaluators on the encoder at initialisation (tcjepa_jax/evaluation.py). Results: the console
and workdir/evals/step_N.json.
"""

from absl import app, flags

from tcjepa_jax.config_lib import run_command
from tcjepa_jax.evaluation import evaluate_checkpoint


def main(argv):
    del argv
    run_command(evaluate_checkpoint, flags.FLAGS.workdir, flags.FLAGS.step, flags.FLAGS.encoder)


def run():
    # Defined here, not at import: train.py defines --workdir too, and both may be imported.
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_enum("encoder", None, ["target", "context"],
                      "Which encoder (default: the config's probe.encoder, target).")
    app.run(main)


if __name__ == "__main__":
    run()
