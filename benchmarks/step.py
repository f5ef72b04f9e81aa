"""Where a train step's time and FLOPs go, per component, and TC-JEPA next to I-JEPA.

    python benchmarks/step.py [--config=configs/synthetic_tiny.py] [--config.KEY=VALUE]
        [--repeats=5] [--steps=10] [--nobreakdown] [--nocompare] [--json=FILE]
    python benchmarks/step.py --paper [--paper_configs=configs/in1k_vit_b16.py,...]
        [--paper_batch=32] [--paper_uncapped] [--paper_set=model.KEY=VALUE,...]

Three sections:

breakdown (default on)
    The step of --config cut into its components, each jitted on its own with the step's real
    shapes and the real model objects (step.build_models), compiled and run on one device:
    target encoder (forward), context encoder (forward + backward), text encoder (forward, or
    forward + backward with model.text_trainable), predictor without its conditioners
    (forward + backward), the text conditioners of every conditioned layer (forward + backward),
    loss and penalties (forward + backward), health monitors (forward), optimizer update + EMA;
    then the whole train step. For each: FLOPs from XLA's cost analysis of the compiled part
    and the median time of --repeats calls after one warm-up call (block_until_ready).
    The parts do not add up exactly to the whole: XLA fuses across them in the step, and the
    step also runs a little glue the parts leave out (see PART_NOTES). The parts, their inputs
    and their timing are built in benchmarks/step_parts.py.
compare (default on)
    images/s and FLOPs of the whole step for TC-JEPA and I-JEPA (conditioning "none") on one
    real batch from the pipeline, and the achieved FLOP/s against a matmul peak measured in
    this same process.
paper (--paper; then only this, unless --breakdown / --compare are given too)
    FLOPs per image of each --paper_configs config at its paper scale, TC-JEPA next to I-JEPA,
    per component and for the whole step, from XLA's cost analysis of the *lowered* programs on
    the host CPU (nothing is compiled or run: tcjepa_jax/flops.py for the whole step, the same
    component functions as the breakdown for the parts), at --paper_batch images per device.

Everything here runs with the layers unrolled and one micro-batch (XLA counts a loop body
once; see tcjepa_jax/flops.py), whatever model.scan_layers and grad_accum say.
"""

import ast
import copy
import importlib.util
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # step_parts.py, next to this file

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tcjepa_jax import host_memory  # noqa: E402
from tcjepa_jax import flops as flops_lib  # noqa: E402
from tcjepa_jax import optim, step as step_lib, sharding as shard_lib  # noqa: E402
from tcjepa_jax.config_lib import DEFAULT_CONFIG, validate_config  # noqa: E402
from step_parts import (PART_NOTES, copy_tree, make_parts, random_maker, random_state,  # noqa: E402
                        synthetic_batch, text_vocab, time_calls, unrolled)

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "compare: timed steps per mode (after a warm-up).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "breakdown: timed calls per part (median).")
_BREAKDOWN = flags.DEFINE_bool("breakdown", True, "Per-component FLOPs and time of --config.")
_COMPARE = flags.DEFINE_bool("compare", True, "Whole-step TC-JEPA vs I-JEPA images/s.")
_PAPER = flags.DEFINE_bool("paper", False, "Paper-scale FLOPs table (lowered, not run).")
_PAPER_CONFIGS = flags.DEFINE_list(
    "paper_configs", ["configs/in1k_vit_b16.py"],
    "--paper: config files (path[:ARGS]), e.g. configs/in1k_vit_l16.py,configs/in1k_vit_h14.py.")
_PAPER_BATCH = flags.DEFINE_integer("paper_batch", 32, "--paper: images per device.")
_PAPER_UNCAPPED = flags.DEFINE_bool(
    "paper_uncapped", False, "--paper: also each config with masks.max_context = max_target = 0 "
    "(the exact slot bounds).")
_PAPER_SET = flags.DEFINE_list(
    "paper_set", [], "--paper: KEY=VALUE overrides of every paper config (TC-JEPA and I-JEPA "
    "alike), e.g. model.cond_mlp=after_pool,model.text_features=precomputed.")
_JSON = flags.DEFINE_string("json", None, "Also write every table's numbers to this JSON file.")

# Rows of the text embedding table when a config leaves it to the tokenizer and no tokenizer is
# built (--paper): T5's pretrained vocabulary (= tcjepa_jax.tools.aot.DEFAULT_TEXT_VOCAB).
PAPER_TEXT_VOCAB = 32128


# ---- Measured breakdown ----------------------------------------------------------------------

def breakdown(config, repeats: int) -> dict:
    """Measured FLOPs and time of every part and of the whole step, on one device."""
    config = unrolled(config)
    with config.unlocked():
        config.mesh = (("data", 1), ("fsdp", 1), ("tensor", 1))
        config.mesh_slices = 1
    validate_config(config)
    device = jax.devices()[0]
    vocab = text_vocab(config)
    models = step_lib.build_models(config, vocab)
    tx = optim.make_optimizer(config)
    mesh = shard_lib.make_mesh(config, devices=[device])
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    state = random_state(models, config, tx, shardings)
    batch = synthetic_batch(models, config, vocab)
    act = random_maker(seed=1)

    parts = make_parts(models, config, tx, copy_tree(state.params), copy_tree(state.ema_params),
                       copy_tree(state.opt_state), jax.tree.map(jnp.asarray, batch), act)
    rows = []
    for part in parts:
        args = copy_tree(part.args) if part.donate else part.args  # donated: its own buffers
        compiled = jax.jit(part.fn, donate_argnums=part.donate).lower(*args).compile()
        seconds = time_calls(compiled, args, repeats, part.carry)
        rows.append({"name": part.name, "passes": part.passes,
                     "flops": step_lib.compiled_flops(compiled), "seconds": seconds})
        del compiled

    train_step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh),
                                         shardings, mesh)
    device_batch = jax.device_put(batch, shard_lib.batch_sharding(mesh))
    compiled = train_step.lower(state, device_batch).compile()
    final = []

    def carry(args, out):
        final[:] = [out[0]]
        return out[0], args[1]

    whole = {"name": "whole train step", "passes": "all", "flops": step_lib.compiled_flops(compiled),
             "seconds": time_calls(compiled, (state, device_batch), repeats, carry)}
    if int(final[0].nonfinite["total"]):
        print("warning: the timed steps had a non-finite loss or gradient, so they skipped the "
              "optimizer update: the whole step's time is too low.")
    return {"config": config.name, "conditioning": config.model.conditioning,
            "batch_size": config.batch_size, "dtype": config.model.dtype,
            "remat": config.model.remat, "text_trainable": bool(config.model.text_trainable),
            "device": f"1 x {device.device_kind}", "repeats": repeats,
            "variant": variant_text(config), "load_average": os.getloadavg()[0],
            "cpus": os.cpu_count(), "parts": rows, "whole": whole}


def print_breakdown(result: dict) -> None:
    b = result["batch_size"]
    print(f"\n## Per-component breakdown: {result['config']}, conditioning="
          f"{result['conditioning']}, batch {b} on {result['device']}, {result['dtype']}, "
          f"remat {result['remat']}{', ' + result['variant'] if result['variant'] else ''}"
          f"; host load average {result['load_average']:.1f} on {result['cpus']} CPUs")
    print(f"Each part jitted and compiled on its own with the step's shapes; FLOPs from XLA's "
          f"cost analysis of the compiled part;\ntime = median of {result['repeats']} calls "
          f"after a warm-up (block_until_ready).")
    total_f = sum(r["flops"] for r in result["parts"])
    total_t = sum(r["seconds"] for r in result["parts"])
    header = (f"{'component':30s} {'pass':8s} {'GFLOP/step':>11s} {'GFLOP/img':>10s} "
              f"{'FLOPs %':>8s} {'ms/step':>9s} {'time %':>7s} {'GFLOP/s':>8s}")
    print(header)
    print("-" * len(header))
    for r in result["parts"] + [{"name": "sum of the parts", "passes": "", "flops": total_f,
                                 "seconds": total_t}, result["whole"]]:
        print(f"{r['name']:30s} {r['passes']:8s} {r['flops'] / 1e9:11.3f} "
              f"{r['flops'] / b / 1e9:10.4f} {r['flops'] / total_f:8.1%} "
              f"{r['seconds'] * 1e3:9.2f} {r['seconds'] / total_t:7.1%} "
              f"{r['flops'] / r['seconds'] / 1e9:8.1f}")
    whole = result["whole"]
    print(f"sum of the parts / whole step: FLOPs x{total_f / whole['flops']:.3f}, "
          f"time x{total_t / whole['seconds']:.2f}. They need not match: in the step XLA fuses "
          f"across the parts (and schedules them together), and the step runs some glue the "
          f"parts leave out (the text/zeros plumbing, metric reductions, nonfinite counters).")


def print_notes():
    print("\nWhat each part includes:")
    for name, note in PART_NOTES.items():
        print(f"  {name}: {note}.")


# ---- Paper-scale FLOPs (lowered, not run) ----------------------------------------------------

def load_config(spec: str):
    """A config from `path/to/config.py[:ARGS]` (relative paths from the repository root)."""
    path, _, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO, path)
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def lowered_flops(fn, args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0))


def paper_flops(config, batch: int, vocab: int = 0) -> dict:
    """FLOPs per device of every part and of the whole step at `batch` images per device, from
    the lowered programs (host CPU, nothing compiled or run)."""
    config = unrolled(config)
    with config.unlocked():
        config.batch_size = batch
        config.mesh = (("data", 1), ("fsdp", 1), ("tensor", 1))
        config.mesh_slices = 1
    vocab = vocab or int(config.model.get("text_vocab_size", 0)) or PAPER_TEXT_VOCAB
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    models = step_lib.build_models(config, vocab)
    tx = optim.make_optimizer(config)
    params = jax.eval_shape(lambda: nn.unbox(step_lib.init_params(models, config,
                                                                  jax.random.key(0))))
    opt_state = jax.eval_shape(tx.init, params)

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu)

    batch_shapes = jax.tree.map(abstract, step_lib.dummy_batch(models, config, batch))
    parts = make_parts(models, config, tx, jax.tree.map(abstract, params),
                       jax.tree.map(abstract, params["encoder"]),
                       jax.tree.map(abstract, opt_state), batch_shapes,
                       lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=cpu))
    rows = [{"name": p.name, "passes": p.passes, "flops": lowered_flops(p.fn, p.args)}
            for p in parts]
    whole = flops_lib.unrolled_step_flops(config, vocab, {})
    return {"config": config.name, "encoder": config.model.encoder,
            "conditioning": config.model.conditioning, "batch_size": batch,
            "image_size": config.input.image_size, "captions": config.input.num_captions,
            "caption_len": config.input.max_caption_len, "text": config.model.text,
            "predictor": f"{config.model.predictor_depth} x {config.model.predictor_width}",
            "caps": (config.masks.max_context, config.masks.max_target),
            "slots": (models.mask_spec.num_context_slots, models.mask_spec.num_target_slots),
            "dtype": config.model.dtype, "remat": config.model.remat,
            "variant": variant_text(config), "parts": rows, "whole": {"name": "whole train step", "passes": "all", "flops": whole}}


def variant_text(config) -> str:
    """The model options that change the step's work, where the config has them."""
    model = config.model
    out = [f"{key} {model[key]}" for key in ("cond_mlp", "cond_pool", "cond_attention",
                                             "text_pack_rows", "text_features") if key in model]
    return ", ".join(out)


def _base_name(name: str) -> str:
    return name.split(" (")[0]


def print_paper(tc: dict, ij: dict) -> None:
    b = tc["batch_size"]
    print(f"\n## Paper-scale FLOPs: {tc['config']} ({tc['encoder']}, {tc['image_size']} px, "
          f"{tc['captions']} captions x {tc['caption_len']} tokens, T5-{tc['text']}, predictor "
          f"{tc['predictor']}, caps {tc['caps'][0]}/{tc['caps'][1]} -> {tc['slots'][0]} context"
          f" / {tc['slots'][1]} target slots, {tc['dtype']}, remat {tc['remat']}"
          f"{', ' + tc['variant'] if tc['variant'] else ''})")
    print(f"GFLOP per image at {b} images per device; XLA cost analysis of the lowered (not run) "
          f"programs on the host CPU, layers unrolled.")
    header = f"{'component':30s} {'pass':8s} {'TC-JEPA':>9s} {'I-JEPA':>9s} {'TC/I':>6s} {'TC %':>6s}"
    print(header)
    print("-" * len(header))
    ij_rows = {_base_name(r["name"]): r for r in ij["parts"]}
    tc_sum = sum(r["flops"] for r in tc["parts"])
    ij_sum = sum(r["flops"] for r in ij["parts"])

    def line(name, passes, t, i):
        ratio = f"{t / i:6.2f}" if i else f"{'-':>6s}"
        ij_text = f"{i / b / 1e9:9.2f}" if i else f"{'-':>9s}"
        print(f"{name:30s} {passes:8s} {t / b / 1e9:9.2f} {ij_text} {ratio} {t / tc_sum:6.1%}")

    for r in tc["parts"]:
        other = ij_rows.get(_base_name(r["name"]))
        line(r["name"], r["passes"], r["flops"], other["flops"] if other else 0.0)
    line("sum of the parts", "", tc_sum, ij_sum)
    line("whole train step", "all", tc["whole"]["flops"], ij["whole"]["flops"])


def override(config, assignments: list):
    """A copy with KEY=VALUE assignments (values as Python literals, else strings)."""
    config = copy.deepcopy(config)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ValueError(f"--paper_set: {assignment!r} is not KEY=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        if name not in node:
            raise ValueError(f"--paper_set: the config has no field {key!r}")
        with config.unlocked():
            node[name] = value
    return config


def paper_tables(specs: list, batch: int, uncapped: bool, assignments: list = ()) -> list:
    out = []
    for spec in specs:
        config = override(load_config(spec), list(assignments))
        variants = [config]
        if uncapped:
            exact = copy.deepcopy(config)
            with exact.unlocked():
                exact.masks.max_context, exact.masks.max_target = 0, 0
                exact.name = config.name + " (caps off)"
            variants.append(exact)
        for variant in variants:
            tc_config = copy.deepcopy(variant)
            ij_config = copy.deepcopy(variant)
            with ij_config.unlocked():
                ij_config.model.conditioning = "none"
            if tc_config.model.conditioning == "none":
                with tc_config.unlocked():
                    tc_config.model.conditioning = "all"
            tc, ij = paper_flops(tc_config, batch), paper_flops(ij_config, batch)
            print_paper(tc, ij)
            out.append({"tc": tc, "ijepa": ij})
    return out


# ---- Whole-step TC-JEPA vs I-JEPA throughput -------------------------------------------------

def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul on the default device: the roofline we compare to."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def measure(config, workdir: str, steps: int) -> dict:
    from tcjepa_jax.data import pipeline
    from tcjepa_jax.experiment import setup
    mesh, tokenizer, models, source = setup(config, workdir)
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    state = step_lib.create_train_state(models, config, tx, shardings)
    data = pipeline.make_train_iterator(config, tokenizer, models.mask_spec, source=source)
    batch = shard_lib.make_global_batch(next(data), shard_lib.batch_sharding(mesh))
    train_step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh),
                                         shardings, mesh)
    compiled = train_step.lower(state, batch).compile()
    flops = step_lib.compiled_flops(compiled)  # per device
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    return {"images_per_s": config.batch_size / seconds, "flops": flops,
            "flops_per_s": flops / seconds}


def compare(config, steps: int) -> dict:
    dtype = jnp.dtype(config.model.dtype)
    peak = matmul_peak_flops(dtype=dtype)  # one device, as the step's FLOPs are per device
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for mode in ("all", "none"):
            mode_config = config.copy_and_resolve_references()
            mode_config.model.conditioning = mode
            results["TC-JEPA" if mode == "all" else "I-JEPA"] = measure(mode_config, tmp, steps)
    print(f"\n## TC-JEPA vs I-JEPA, whole step: {config.name}, batch {config.batch_size}, encoder "
          f"{config.model.encoder}, {config.model.dtype}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}")
    print(f"matmul peak measured here: {peak / 1e9:.1f} GFLOP/s per device")
    for name, r in results.items():
        print(f"{name:8s} {r['images_per_s']:8.1f} img/s  {r['flops'] / 1e9:8.2f} GFLOP/step/device  "
              f"{r['flops_per_s'] / 1e9:7.1f} GFLOP/s/device  = {r['flops_per_s'] / peak:.1%} of peak")
    tc, ij = results["TC-JEPA"], results["I-JEPA"]
    print(f"TC-JEPA / I-JEPA: step FLOPs x{tc['flops'] / ij['flops']:.2f}, "
          f"images/s x{tc['images_per_s'] / ij['images_per_s']:.2f}, "
          f"FLOP/s x{tc['flops_per_s'] / ij['flops_per_s']:.2f}")
    return dict(results, peak_flops_per_s=peak)


def main(argv):
    del argv
    config = _CONFIG.value
    host_memory.configure(config.get("host_malloc", "reuse"))  # as the trainer does
    paper_only = _PAPER.value
    run_breakdown = _BREAKDOWN.value and (not paper_only or flags.FLAGS["breakdown"].present)
    run_compare = _COMPARE.value and (not paper_only or flags.FLAGS["compare"].present)
    report = {}
    if run_breakdown:
        if config.model.get("scan_layers", False) or int(config.get("grad_accum", 1) or 1) > 1:
            print("note: the breakdown runs the step with its layers unrolled and one "
                  "micro-batch (model.scan_layers / grad_accum of the config ignored).")
        report["breakdown"] = breakdown(config, _REPEATS.value)
        print_breakdown(report["breakdown"])
    if run_compare:
        report["compare"] = compare(config, _STEPS.value)
    if _PAPER.value:
        report["paper"] = paper_tables(_PAPER_CONFIGS.value, _PAPER_BATCH.value,
                                       _PAPER_UNCAPPED.value, _PAPER_SET.value)
    if run_breakdown or _PAPER.value:
        print_notes()
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
