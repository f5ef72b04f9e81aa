"""Export a run's trained weights for PyTorch.

    python -m tcjepa_jax.export --workdir=DIR --out=FILE.safetensors
        [--format=timm|full] [--step=N] [--encoder=target|context] [--image_size=N]

`timm` (the default): one encoder (the target encoder unless --encoder=context) as a state
dict that timm's VisionTransformer loads with strict=True; FILE.json beside it holds the
constructor kwargs (also in the safetensors metadata). `full`: every module (both encoders,
predictor with its text conditioners, text encoder) under documented key names, plus
FILE.config.json; tcjepa_jax.export.load_full reads it back into our parameter trees.
Only the parameters needed are read from the checkpoint (no optimizer state, no data).
"""

import json
import logging as logging_std
import sys

from absl import app, flags, logging

from tcjepa_jax.config_lib import UserError, run_command
from tcjepa_jax.export import full_format, timm_format
from tcjepa_jax.export.restore import CONTEXT, PREDICTOR, TARGET, TEXT, CheckpointReader


def _define_flags():
    """Defined when the command runs, not on import: train.py and evaluate.py define flags of
    the same names, and importing `export` next to them must not clash."""
    defined = flags.FLAGS
    if "workdir" not in defined:
        flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
    if "out" not in defined:
        flags.DEFINE_string("out", None, "Output file, e.g. encoder.safetensors.")
    if "format" not in defined:
        flags.DEFINE_enum("format", "timm", ["timm", "full"],
                          "timm: one encoder for timm's VisionTransformer; full: every module.")
    if "step" not in defined:
        flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    if "encoder" not in defined:
        flags.DEFINE_enum("encoder", "target", ["target", "context"],
                          "timm format: the target (EMA) or the context encoder.")
    if "image_size" not in defined:
        flags.DEFINE_integer("image_size", None, "timm format: the input size the model is "
                             "built for (default: the run's input.image_size).")
    for name in ("workdir", "out", "format", "step", "encoder", "image_size"):  # for --help
        defined.register_key_flag_for_module(sys.argv[0], defined[name])


def export(workdir: str, out: str, format: str = "timm", step=None,
           encoder: str = "target", image_size=None) -> dict:
    """Writes the export; returns {"step", "files", ...} describing it.

    `image_size` (timm format) builds the timm model for another input size than the run's:
    our encoder computes its sin-cos position embedding for whatever grid it gets, timm stores
    one for a fixed grid, so the export writes the one of that size."""
    if format not in ("timm", "full"):
        raise UserError(f"--format={format!r}; choose timm or full.")
    if encoder not in ("target", "context"):
        raise UserError(f"--encoder={encoder!r}; choose target or context.")
    with CheckpointReader(workdir) as reader:
        step = reader.step(step)
        config = reader.config(step)
        if format == "timm":
            path = TARGET if encoder == "target" else CONTEXT
            params = reader.restore(step, path)[path]
        else:
            trees = reader.restore(step, TARGET, CONTEXT, PREDICTOR, TEXT)
    if format == "timm":
        if image_size:
            config.input.image_size = int(image_size)
        return _write_timm(out, params, config, step, encoder)
    params = {path[-1]: tree for path, tree in trees.items() if path[0] == "params"}
    files = full_format.save_full(out, params, trees[TARGET], config, step)
    return {"step": step, "format": "full", "files": files}


def _write_timm(out, params, config, step, encoder) -> dict:
    from safetensors.numpy import save

    try:
        kwargs = timm_format.timm_kwargs(config)
    except ValueError as e:
        raise UserError(str(e)) from e
    state_dict = timm_format.to_timm(params, config)
    info = {"format": "timm", "encoder": encoder, "step": step,
            "model.encoder": config.model.encoder, "timm_kwargs": kwargs,
            "preprocessing": timm_format.preprocessing(config),
            "notes": "pos_embed holds the fixed 2-D sin-cos position embedding (not learned "
                     "in tcjepa_jax): freeze it (requires_grad_(False)) to fine-tune the same "
                     "model; timm's forward_features = our encoder's output tokens (final "
                     "LayerNorm applied), forward = their mean."}
    meta = {"format": "pt", "tcjepa_export": "timm", "encoder": encoder, "step": str(step),
            "timm_kwargs": json.dumps(kwargs), "model.encoder": config.model.encoder}
    full_format.write_bytes(out, save(state_dict, metadata=meta))
    side = full_format.sidecar(out, ".json")
    full_format.write_bytes(side, (json.dumps(info, indent=1) + "\n").encode())
    return {"step": step, "format": "timm", "files": [out, side], "timm_kwargs": kwargs}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir or not f.out:
        raise app.UsageError("--workdir and --out are required.")
    # Reading a checkpoint read-only makes Orbax warn about what it does not restore.
    logging.get_absl_handler().addFilter(_QuietOrbax())
    encoder = f.encoder or "target"

    def job():
        result = export(f.workdir, f.out, f.format, f.step, encoder, f.image_size)
        what = f"the {encoder} encoder" if result["format"] == "timm" else "every module"
        print(f"Exported {what} of step {result['step']} ({result['format']} format): "
              + ", ".join(result["files"]))

    run_command(job)


class _QuietOrbax(logging_std.Filter):
    def filter(self, record):
        return record.levelno >= logging_std.ERROR or "orbax" not in record.pathname


def run():
    """Console-script entry point (tcjepa-export)."""
    _define_flags()
    main_module = sys.modules["__main__"]
    if not getattr(main_module, "__doc__", None):  # absl prints it for --help
        main_module.__doc__ = __doc__
    app.run(main)


if __name__ == "__main__":
    run()
