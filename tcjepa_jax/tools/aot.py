"""Compile the real train step for a TPU slice on this host, ahead of time: does it fit?

    python -m tcjepa_jax.tools.aot --config=configs/F.py[:ARGS] --topology=v5p:4x4x4 \
        [--assumed_mfu=0.4] [--json=FILE] [--config.KEY=VALUE ...]

Builds the same models, optimizer, mesh and shardings as train.py, with abstract inputs
(shapes, dtypes, shardings; no data, no tokenizer, no parameters in memory), and compiles the
train step for the named TPU topology through libtpu's compile-only devices, which work on any
Linux host with `libtpu` installed (`pip install -e ".[test]"`). Prints XLA's per-chip memory
analysis against the chip's HBM (tcjepa_jax/chips.py), the FLOPs of one step per chip, and an
*estimated* step time at an assumed MFU: a planning number, not a measurement.

Exit status: 0 when the step fits, 2 when it does not (the last line says which knobs to turn),
1 for a config or topology mistake (found before compiling).
"""

import os

# Before jax loads: the host's own backend is the CPU (the TPU topology is compiled for, never
# run on), and libtpu must neither wait for TPU metadata nor take the single-process TPU
# lock another JAX process on this host may hold.
for _key, _value in (("JAX_PLATFORMS", "cpu"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                     ("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost")):
    os.environ.setdefault(_key, _value)

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from tcjepa_jax import chips  # noqa: E402
from tcjepa_jax import flops as flops_lib  # noqa: E402
from tcjepa_jax import optim  # noqa: E402
from tcjepa_jax import sharding as shard_lib  # noqa: E402
from tcjepa_jax import step as step_lib  # noqa: E402
from tcjepa_jax.config_lib import UserError, config_value, define_config_flag, parse_flags, run_command, validate_config  # noqa: E402

_CONFIG = define_config_flag()
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice to compile for: GENERATION:AxB[xC], e.g. v5e:2x2, v6e:8x8, "
    "v4:2x2x2, v5p:4x4x4 (generations: v4, v5e, v5p, v6e).", required=True)
_MFU = flags.DEFINE_float(
    "assumed_mfu", 0.4, "Model FLOPs utilisation assumed for the step-time estimate (0, 1].")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")

# Rows of the text embedding table when the config leaves it to the tokenizer (which this tool
# does not build): T5's pretrained vocabulary.
DEFAULT_TEXT_VOCAB = 32128
EXIT_DOES_NOT_FIT = 2
GiB = chips.GiB


class DoesNotFit(Exception):
    """The compiled step needs more memory than a chip has; the message names the knobs."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# ---- Topology --------------------------------------------------------------------------------

def topology_devices(topology: str) -> list:
    """libtpu's compile-only devices of a slice; UserError if libtpu or the name is missing."""
    try:
        import libtpu  # noqa: F401  (jax finds the plugin through this package)
    except ImportError:
        raise UserError("compiling for a TPU topology needs libtpu on this host: "
                        'pip install -e ".[test]" (or pip install "jax[tpu]").') from None
    from jax.experimental import topologies
    # libtpu prints warnings about the missing TPU VM metadata (which a compile-only topology
    # does not need) straight to the process's stderr; keep them out of the report.
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        except Exception as e:  # noqa: BLE001 - libtpu's own message says what is wrong
            raise UserError(f"libtpu could not make topology {topology!r}: "
                            f"{str(e).splitlines()[0]}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return list(devices)


def devices_per_chip(devices) -> int:
    """JAX devices per physical chip: 2 for compile-only TPU v4 (one per core), else 1."""
    per_chip = Counter(tuple(getattr(d, "coords", (d.id,))) for d in devices)
    return max(per_chip.values())


# ---- Compile and report ----------------------------------------------------------------------

def analyse(config, topology: str, assumed_mfu: float) -> dict:
    """Compiles the train step for `topology`; returns the report's numbers.

    Raises UserError for mistakes found before compiling and DoesNotFit (after filling the
    report) when the step needs more memory than a chip has.
    """
    # Everything the user can get wrong, before any compilation.
    try:
        chip = chips.chip_for_topology(topology)
        validate_config(config)
        if not 0 < assumed_mfu <= 1:
            raise ValueError(f"--assumed_mfu={assumed_mfu} must lie in (0, 1].")
    except ValueError as e:
        raise UserError(str(e)) from e
    devices = topology_devices(topology)
    per_chip = devices_per_chip(devices)
    vocab = int(config.model.get("text_vocab_size", 0)) or DEFAULT_TEXT_VOCAB
    try:
        mesh = shard_lib.make_mesh(config, devices=devices)
        if config.batch_size % mesh.size:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                             f"{mesh.size} devices of {topology}'s mesh.")
        accum = int(config.get("grad_accum", 1) or 1)
        if accum < 1 or config.batch_size % (mesh.size * accum):
            raise ValueError(f"grad_accum={accum} must divide each device's "
                             f"{config.batch_size // mesh.size} images of batch_size="
                             f"{config.batch_size}.")
        models = step_lib.build_models(config, vocab)
        tx = optim.make_optimizer(config)
        # Tracing the initialiser checks the rest of the model config (e.g. model.remat).
        shardings = step_lib.state_shardings(models, config, tx, mesh)
        state, batch = flops_lib.abstract_inputs(models, config, tx, shardings, mesh)
    except (ValueError, KeyError) as e:
        raise UserError(str(e)) from e

    hbm = chip.hbm_bytes / per_chip  # per device
    peak = chips.peak_flops(config, devices[0], per_chip) or chip.peak_bf16_flops / per_chip
    report = {
        "config": config.name, "topology": topology, "chip": chip.name,
        "device_kind": devices[0].device_kind, "num_chips": len(devices) // per_chip,
        "num_devices": len(devices), "devices_per_chip": per_chip,
        "mesh": dict(mesh.shape), "batch_size": config.batch_size,
        "grad_accum": accum,
        "encoder": config.model.encoder, "conditioning": config.model.conditioning,
        "remat": config.model.remat, "dtype": config.model.dtype,
        "text_vocab_size": vocab if models.text is not None else 0,
        "hbm_bytes_per_device": hbm, "peak_flops_per_device": peak, "assumed_mfu": assumed_mfu,
    }
    _print_header(config, report, models)

    # As train.py builds it: the same step, the same shardings, activations pinned by the mesh.
    train_step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh),
                                         shardings, mesh)
    print(f"compiling the train step for {topology} (minutes for a large model)...", flush=True)
    t0 = time.perf_counter()
    try:
        compiled = train_step.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        report["compile_s"] = time.perf_counter() - t0
        oom = _oom(str(e))
        if oom is None:
            raise
        xla_message = str(e).strip().splitlines()[0]
        report.update(fits=False, memory={"total": oom[0]}, xla_hbm_available=oom[1],
                      xla_message=xla_message)
        print(f"compile stopped after {report['compile_s']:.1f} s: {xla_message}")
        raise DoesNotFit(_knobs(config, report), report) from None
    report["compile_s"] = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    memory = {
        "arguments": mem.argument_size_in_bytes,
        "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes,      # outputs written into the donated state
        "temporaries": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
    }
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                       + memory["temporaries"] + memory["generated_code"])
    flops, flops_source = step_lib.compiled_flops(compiled), "compiled step"
    if flops_lib.needs_unrolled_count(config):
        # The compiled step loops over layers or micro-batches, which XLA counts once.
        flops = flops_lib.unrolled_step_flops(config, vocab, dict(mesh.shape))
        flops_source = "the step with unrolled layers, lowered for one device's share"
    step_s = flops / (peak * assumed_mfu) if flops > 0 else float("nan")
    report.update(memory=memory, flops_per_device=flops, flops_source=flops_source, fits=memory["total"] <= hbm,
                  scan_layers=bool(config.model.get("scan_layers", False)),
                  est_step_s=step_s, est_images_per_s=config.batch_size / step_s)
    _print_numbers(report)
    if not report["fits"]:
        raise DoesNotFit(_knobs(config, report), report)
    print(f"fits: {_gib(memory['total'])} of {_gib(hbm)} HBM per {_unit(per_chip)} "
          f"({memory['total'] / hbm:.0%}).")
    return report


def _oom(message: str):
    """(needed, available) bytes from XLA:TPU's out-of-HBM compile error; None for other errors.

    XLA says e.g. "Ran out of memory on HBM, the total memory required for HLO temporaries
    (40.60G) exceeds available HBM (15.75G)" or "Used 20.5G of 15.48G hbm"; G means GiB.
    """
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    sizes = [float(v) * scale[u] for v, u in re.findall(r"\b([\d.]+)([KMGT]?)(?:i?B)?\b(?=\)|\s+of\s|\s+hbm)",
                                                         message)]
    return (sizes[0], sizes[1]) if len(sizes) >= 2 else (float("nan"), float("nan"))


def _knobs(config, report) -> str:
    """The one-line verdict when the step does not fit: how much, and which knobs to turn."""
    unit, total = _unit(report["devices_per_chip"]), report["memory"]["total"]
    if "xla_message" in report:  # XLA gave up while compiling; its number is temporaries only
        need = (f"XLA needs {_gib(total)} for temporaries alone per {unit}, of "
                f"{_gib(report['xla_hbm_available'])} usable HBM")
    else:
        need = f"it needs {_gib(total)} per {unit}, of {_gib(report['hbm_bytes_per_device'])} HBM"
    mesh = ", ".join(f"{k}={v}" for k, v in report["mesh"].items())
    # model.remat was a bool and is becoming a named policy (models/layers.py); name the right one.
    remat_on = "True" if isinstance(config.model.remat, bool) else "full"
    fsdp_sizes = {"data": 1, "fsdp": -1}
    fsdp_mesh = "(" + ", ".join(f'("{name}", {fsdp_sizes.get(name, size)})'
                                for name, size in config.mesh) + ")"
    return (f"the train step does not fit on {report['topology']}: {need}. Turn one of these "
            f"knobs: a smaller --config.batch_size (now {config.batch_size}); "
            f"--config.model.remat={remat_on} to recompute activations in the backward pass "
            f"(now {config.model.remat}); a larger fsdp axis to shard parameters and optimizer "
            f"state (now {mesh}; over all chips: --config.mesh='{fsdp_mesh}'); gradient "
            f"accumulation, --config.grad_accum (now {report['grad_accum']}); or a larger "
            "topology.")


# ---- Printing --------------------------------------------------------------------------------

def _gib(n) -> str:
    return f"{n / GiB:.2f} GiB"


def _unit(per_chip: int) -> str:
    return "chip" if per_chip == 1 else f"device (1/{per_chip} chip)"


def _print_header(config, report, models):
    mode = "I-JEPA" if models.text is None else "TC-JEPA"
    print(f"config {config.name}: {mode}, encoder {config.model.encoder}, predictor depth "
          f"{config.model.predictor_depth}, {config.model.dtype}, remat {config.model.remat}, "
          f"global batch {config.batch_size}")
    if models.text is not None:
        source = ("model.text_vocab_size" if config.model.get("text_vocab_size", 0)
                  else "T5's 32128: no tokenizer is read, model.text_vocab_size=0")
        print(f"text encoder T5-{config.model.text}, {config.input.num_captions} captions x "
              f"{config.input.max_caption_len} tokens, vocab {report['text_vocab_size']} "
              f"({source})")
    chip = chips.chip_for_topology(report["topology"])
    per = "" if report["devices_per_chip"] == 1 else \
        f", {report['num_devices']} devices ({report['devices_per_chip']} per chip)"
    print(f"topology {report['topology']}: {report['num_chips']} chips x {report['device_kind']} "
          f"({chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {_gib(chip.hbm_bytes)} HBM each{per})")
    mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
    print(f"mesh {mesh}; {config.batch_size // report['num_devices']} images per device per step")


def _print_numbers(report):
    mem, hbm, unit = report["memory"], report["hbm_bytes_per_device"], _unit(report["devices_per_chip"])
    print(f"compiled in {report['compile_s']:.1f} s")
    print(f"memory per {unit} (XLA memory analysis):")
    for name in ("arguments", "outputs", "aliased", "temporaries", "generated_code"):
        sign = "-" if name == "aliased" else " "
        print(f"  {name.replace('_', ' '):15s}{sign}{_gib(mem[name]):>12s}")
    print(f"  {'total':15s} {_gib(mem['total']):>12s}  = {mem['total'] / hbm:.1%} of "
          f"{_gib(hbm)} HBM")
    print(f"FLOPs per step per {unit}: {report['flops_per_device']:.3e} (XLA cost analysis of "
          f"{report['flops_source']})")
    print(f"estimate at an assumed {report['assumed_mfu']:.0%} MFU (an assumption, not a "
          f"measurement): {report['est_step_s'] * 1e3:.1f} ms/step, "
          f"{report['est_images_per_s']:.0f} images/s")


# ---- Command line ----------------------------------------------------------------------------

def run_aot(config, topology: str, assumed_mfu: float, json_path=None) -> dict:
    """The command: report, write the JSON (fit or not), exit 2 with the knobs if it does not fit."""
    try:
        report = analyse(config, topology, assumed_mfu)
    except DoesNotFit as e:
        _write_json(json_path, e.report)
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DOES_NOT_FIT)
    _write_json(json_path, report)
    return report


def _write_json(path, report):
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)


def main(argv):
    del argv
    run_command(run_aot, config_value(_CONFIG), _TOPOLOGY.value, _MFU.value, _JSON.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
