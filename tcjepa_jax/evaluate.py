"""Evaluate a run's checkpoint with its configured evaluators.

    python -m tcjepa_jax.evaluate --workdir=runs/synthetic_tiny [--step=N] [--encoder=target|context] \
        [--probe.num_train=8000 --probe.num_test=2000 --probe.attentive_steps=400 ...]

Reads the config saved with the checkpoint, restores only the encoder it evaluates (not the
optimizer state or the other encoder), and runs config.probe.evaluators next to the same
evaluators on the encoder at initialisation (tcjepa_jax/evaluation.py). Results: the console
and workdir/evals/step_N.json. `--probe.FIELD=VALUE` replaces a field of the saved config's
probe section (configs/common.py lists them) for this evaluation only, e.g. larger probe sets;
the results then go to workdir/evals/probe_overrides/step_N.json with the overrides recorded,
and the run's own evals/step_N.json stays what training measured.
"""

from absl import app, flags

from tcjepa_jax.config_lib import define_config_dict_flag, parse_flags, run_command
from tcjepa_jax.evaluation import evaluate_checkpoint


def main(argv):
    del argv
    from ml_collections import config_flags
    overrides = config_flags.get_override_values(flags.FLAGS["probe"])
    run_command(evaluate_checkpoint, flags.FLAGS.workdir, flags.FLAGS.step, flags.FLAGS.encoder,
                overrides)


def run():
    from configs import common
    # Defined here, not at import: train.py defines --workdir too, and both may be imported.
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_enum("encoder", None, ["target", "context"],
                      "Which encoder (default: the config's probe.encoder, target).")
    # Only the fields given on the command line are applied (their types and names checked
    # against the defaults here); the rest of the probe section is the saved config's.
    define_config_dict_flag("probe", common.get_base_config().probe,
                            "Probe fields to override: --probe.FIELD=VALUE.")
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
