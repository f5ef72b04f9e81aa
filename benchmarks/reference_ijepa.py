"""Our train step next to the official I-JEPA one (facebookresearch/ijepa), in one process.

    git clone https://github.com/facebookresearch/ijepa /path/to/ijepa
    python benchmarks/reference_ijepa.py --ijepa_dir=/path/to/ijepa [--steps=10] [--threads=2]

The reference (PyTorch, imported at run time from --ijepa_dir, not part of this repository):
its ViT, predictor, MaskCollator (I-JEPA's mask settings) and init_opt (AdamW, schedules), and
the step of its src/train.py: target forward without gradient + LayerNorm, context encoder,
predictor, smooth-L1, AdamW, EMA; random images. Ours: tcjepa_jax.step's train step on the same
model and batch in I-JEPA mode (model.conditioning="none"), masks.max_context/max_target set to
the mean lengths the reference's collator produced (the same tokens per image), and in TC-JEPA
mode (4 captions of 24 tokens, tiny T5): with T5 in the step; with precomputed text features
(model.text_features="precomputed": random features of T5's shape in the batch, no T5 forward);
and "lean": precomputed features, cond_mlp="after_pool" and cond_pool="attention", the options
under the 1.3x FLOPs target at paper scale (docs/performance.md).
The steps are timed in turns, one of each per round,
so a change of load on the machine hits all alike. GFLOP/img counts matmuls for both (torch's
FlopCounterMode; the dot_generals of our step's jaxpr), "% peak" is against a matmul peak
measured in this process per framework; XLA's cost analysis (elementwise work too) is beside it.
--host_malloc sets glibc's malloc for the whole process, so for both frameworks alike
(tcjepa_jax/host_memory.py; "reuse" is the trainer's default); "faults" is the minor page
faults per step, the cost that setting removes.
Without --ijepa_dir only ours runs, with the caps of --max_context / --max_target.
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"mu": "mu", "tiny": "T", "small": "S", "base": "B", "large": "L", "huge": "H"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ijepa_dir", default="", help="a checkout of facebookresearch/ijepa")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--pred_width", type=int, default=384)
    p.add_argument("--pred_depth", type=int, default=6)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both frameworks")
    p.add_argument("--max_context", type=int, default=-1,
                   help="our context cap; -1: the reference's mean length (0 without it)")
    p.add_argument("--max_target", type=int, default=-1,
                   help="our cap per target block; -1: the reference's mean (0 without it)")
    p.add_argument("--no_tc", action="store_true", help="skip every TC-JEPA row")
    p.add_argument("--no_precomputed", action="store_true",
                   help="skip the TC-JEPA rows with precomputed text features")
    p.add_argument("--peak_size", type=int, default=2048, help="matrix side of the peak test")
    p.add_argument("--host_malloc", default="reuse", choices=("reuse", "system"),
                   help="glibc malloc of the process, both frameworks (tcjepa_jax/host_memory.py)")
    return p.parse_args(argv)


def timed(fn, repeats):
    """Median seconds of fn() over `repeats` calls (fn blocks until its work is done)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- The reference -------------------------------------------------------------------------------

class Reference:
    """facebookresearch/ijepa's encoder, predictor, MaskCollator and init_opt; the step of its
    src/train.py (fp32, one process, so no DDP or AllReduce)."""
    name, framework = "reference I-JEPA (PyTorch)", "torch"

    def __init__(self, args, width, depth, heads, total_steps):
        import copy
        import functools
        import logging
        import torch
        sys.path.insert(0, os.path.abspath(args.ijepa_dir))
        from src.helper import init_opt
        from src.masks.multiblock import MaskCollator
        from src.masks.utils import apply_masks
        from src.models import vision_transformer as vit
        from src.utils.logging import grad_logger
        from src.utils.tensors import repeat_interleave_batch
        logging.getLogger().setLevel(logging.WARNING)  # its helper logs at INFO to stdout
        torch.manual_seed(0)
        size, patch = args.image_size, args.patch
        if size // patch < 10:  # its sampler retries forever a target block of <= min_keep
            sys.exit(f"error: the reference needs a patch grid of at least 10x10 "
                     f"(--image_size / --patch), got {size // patch}x{size // patch}")
        factory = getattr(vit, f"vit_{args.model}", None)  # vit_tiny etc.; "mu" is ours only
        if factory is None:
            factory = functools.partial(
                vit.VisionTransformer, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4,
                qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
        self.encoder = factory(img_size=[size], patch_size=patch)
        self.predictor = vit.vit_predictor(
            num_patches=self.encoder.patch_embed.num_patches, embed_dim=self.encoder.embed_dim,
            predictor_embed_dim=args.pred_width, depth=args.pred_depth,
            num_heads=self.encoder.num_heads)
        self.target = copy.deepcopy(self.encoder)
        for p in self.target.parameters():
            p.requires_grad = False
        self.opt, _, self.lr_sched, self.wd_sched = init_opt(
            encoder=self.encoder, predictor=self.predictor, iterations_per_epoch=total_steps,
            start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6, warmup=0.1, num_epochs=1, wd=0.04,
            final_wd=0.4, ipe_scale=1.0)
        self.momentum = iter([0.996 + 0.004 * i / total_steps for i in range(total_steps + 1)])
        collator = MaskCollator(  # I-JEPA's mask settings (its configs/*.yaml)
            input_size=size, patch_size=patch, enc_mask_scale=(0.85, 1.0),
            pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
            min_keep=10, allow_overlap=False)
        self.batches = [collator([0] * args.batch)[1:] for _ in range(total_steps - 1)]
        self.images = torch.randn(args.batch, 3, size, size)
        self.torch, self.grad_logger = torch, grad_logger
        self.apply_masks, self.repeat = apply_masks, repeat_interleave_batch
        self.steps_run = 0

    def step(self, masks=None):
        torch, F = self.torch, self.torch.nn.functional
        if masks is None:  # the run's next batch
            masks = self.batches[self.steps_run % len(self.batches)]
            self.steps_run += 1
        masks_enc, masks_pred = masks
        imgs = self.images
        self.lr_sched.step()
        self.wd_sched.step()
        with torch.no_grad():
            h = self.target(imgs)
            h = self.repeat(self.apply_masks(F.layer_norm(h, (h.size(-1),)), masks_pred),
                            len(imgs), repeat=len(masks_enc))
        z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        self.opt.step()
        self.grad_logger(self.encoder.named_parameters())
        self.opt.zero_grad()
        with torch.no_grad():
            m = next(self.momentum)
            for q, k in zip(self.encoder.parameters(), self.target.parameters()):
                k.mul_(m).add_((1.0 - m) * q.detach())
        return float(loss.detach())

    def matmul_flops(self, ctx, tgt):
        """FLOPs of one step whose masks are cut to ctx and tgt (per block) tokens, as its
        collator cuts a batch's masks to their shortest."""
        from torch.utils.flop_counter import FlopCounterMode
        enc = max((b[0] for b in self.batches), key=lambda m: m[0].shape[1])
        pred = max((b[1] for b in self.batches), key=lambda m: m[0].shape[1])
        counter = FlopCounterMode(display=False)
        with counter:
            self.step(([m[:, :ctx] for m in enc], [m[:, :tgt] for m in pred]))
        return counter.get_total_flops()

    def tokens(self):
        """Mean context and target tokens per image over every batch of the run (its collator
        cuts each batch's masks to their shortest)."""
        ctx, tgt = (statistics.mean(m[0].shape[1] for m in ms) for ms in zip(*self.batches))
        return ctx, 4 * tgt

    def peak(self, n, repeats=10):
        a = self.torch.randn(n, n)
        a @ a
        return 2 * n ** 3 / timed(lambda: a @ a, repeats)


# ---- Ours --------------------------------------------------------------------------------------

def jaxpr_matmul_flops(jaxpr) -> float:
    """2*M*N*K over the dot_generals of a jaxpr and its sub-jaxprs (scan bodies times their
    length, the larger branch of a cond): what FlopCounterMode counts for torch."""
    from jax.extend import core
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        subs = []
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, core.ClosedJaxpr):
                    v = v.jaxpr
                if isinstance(v, core.Jaxpr):
                    subs.append(jaxpr_matmul_flops(v))
        if subs:
            reps = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            total += reps * (max(subs) if eqn.primitive.name == "cond" else sum(subs))
    return total


class Ours:
    framework = "jax"

    def __init__(self, args, heads, conditioning, max_context, max_target, workdir,
                 variant=""):
        import jax
        import numpy as np
        from configs import synthetic_tiny
        from tcjepa_jax import optim, sharding as shard_lib, step as step_lib
        from tcjepa_jax.data import pipeline
        from tcjepa_jax.experiment import setup
        self.name = (f"ours, {'I-JEPA' if conditioning == 'none' else 'TC-JEPA'} mode"
                     if not variant else f"ours, TC-JEPA {variant}")
        self.jax = jax
        c = synthetic_tiny.get_config()
        c.batch_size, c.total_steps, c.input.image_size = args.batch, 1000, args.image_size
        c.input.num_captions, c.input.max_caption_len = 4, 24
        c.masks.max_context, c.masks.max_target = max_context, max_target
        c.model.encoder = f"{MODELS[args.model]}/{args.patch}"
        c.model.predictor_width, c.model.predictor_depth = args.pred_width, args.pred_depth
        c.model.predictor_heads = heads  # as the reference: the encoder's
        c.model.text, c.model.dtype, c.model.conditioning = "tiny", "float32", conditioning
        c.probe.enabled = False
        # The synthetic data and the tokenizer come from the config with T5 in the step (the
        # config checks want stored features for "precomputed"); the model from the other.
        mesh, tokenizer, models, source = setup(c, workdir)
        data = pipeline.make_train_iterator(c, tokenizer, models.mask_spec, source=source)
        local = next(data)
        if variant:
            c = c.copy_and_resolve_references()
            c.model.text_features = "precomputed"
            if variant == "lean":
                c.model.cond_mlp, c.model.cond_pool = "after_pool", "attention"
            models = step_lib.build_models(c, models.text.vocab_size)
            # Random features where the words are, zeros at padding, in the width and dtype
            # the step expects (dummy_batch's): what it reads instead of running T5.
            template = step_lib.dummy_batch(models, c)["text_features"]
            shape = local["text_ids"].shape + template.shape[-1:]
            features = np.random.default_rng(0).standard_normal(shape, np.float32)
            local["text_features"] = (features * local["text_mask"][..., None]).astype(
                template.dtype)
        tx = optim.make_optimizer(c)
        shardings = step_lib.state_shardings(models, c, tx, mesh)
        self.state = step_lib.create_train_state(models, c, tx, shardings)
        self.batch = shard_lib.make_global_batch(local, shard_lib.batch_sharding(mesh))
        step = step_lib.jit_train_step(step_lib.make_train_step(models, c, tx, mesh),
                                       shardings, mesh)
        traced = step.trace(self.state, self.batch)
        self.flops = jaxpr_matmul_flops(traced.jaxpr.jaxpr) / args.batch
        self.compiled = traced.lower().compile()
        self.xla_flops = step_lib.compiled_flops(self.compiled) / args.batch
        spec = models.mask_spec
        self.slots = (spec.num_context_slots, spec.num_targets * spec.num_target_slots)
        self.valid = (float(self.batch["context_valid"].sum(1).mean()),
                      float(self.batch["target_valid"].sum((1, 2)).mean()))

    def step(self):
        self.state, metrics = self.compiled(self.state, self.batch)
        self.jax.block_until_ready(metrics)

    def tokens(self):
        return self.slots

    def peak(self, n, repeats=10):
        a = self.jax.random.normal(self.jax.random.key(0), (n, n), self.jax.numpy.float32)
        f = self.jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        return 2 * n ** 3 / timed(lambda: f(a).block_until_ready(), repeats)


# ---- Main --------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    # Both frameworks read their thread counts at start-up: XLA's CPU client sizes its Eigen
    # pool from NPROC, torch from set_num_threads (MKL/OpenMP from the OMP variable).
    os.environ["NPROC"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    from tcjepa_jax import host_memory
    host_memory.configure(args.host_malloc)  # before either framework starts its threads
    import torch
    torch.set_num_threads(args.threads)
    from tcjepa_jax.models.vit import VIT_SIZES
    width, depth, heads = VIT_SIZES[MODELS[args.model]]
    runs = []
    total = args.warmup + args.steps + 1  # + 1: the step FlopCounterMode counts
    caps = [args.max_context, args.max_target]
    if args.ijepa_dir:
        ref = Reference(args, width, depth, heads, total)
        for _ in range(args.warmup):
            ref.step()
        runs.append(ref)
        # Our caps: the mean lengths of the batches the reference's collator made for this run;
        # its FLOPs are counted on one step at those lengths.
        ctx, tgt = ref.tokens()
        caps = [round(x) if c < 0 else c for x, c in zip((ctx, tgt / 4), caps)]
        ref.flops = ref.matmul_flops(round(ctx), round(tgt / 4)) / args.batch
    else:
        print("reference skipped: no --ijepa_dir (git clone https://github.com/facebookresearch/"
              "ijepa, then --ijepa_dir=ijepa)")
    caps = [max(c, 0) for c in caps]
    with tempfile.TemporaryDirectory() as tmp:
        modes = [("none", "")]  # (conditioning, TC-JEPA variant)
        if not args.no_tc:
            modes += [("all", "")] + ([] if args.no_precomputed else
                                      [("all", "precomputed"), ("all", "lean")])
        for mode, variant in modes:
            run = Ours(args, heads, mode, caps[0], caps[1], tmp, variant)
            for _ in range(args.warmup):
                run.step()
            runs.append(run)
    # Each framework's matmul peak, then the steps in turns: one of each per round.
    peaks = {f: run.peak(args.peak_size) for f, run in {r.framework: r for r in runs}.items()}
    load = os.getloadavg()[0]
    times = {run.name: [] for run in runs}  # (wall, CPU of the process) seconds, minor faults
    for _ in range(args.steps):
        for run in runs:
            t0, c0, f0 = time.perf_counter(), time.process_time(), _minor_faults()
            run.step()
            times[run.name].append((time.perf_counter() - t0, time.process_time() - c0,
                                    _minor_faults() - f0))
    report(args, runs, times, peaks, caps, load, (width, depth, heads))


def _minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def report(args, runs, times, peaks, caps, load, vit):
    import jax
    import torch

    print(f"\n{args.model} ({vit[0]}x{vit[1]}, {vit[2]} heads) /{args.patch}, {args.image_size} px, "
          f"batch {args.batch}, predictor {args.pred_depth}x{args.pred_width}, float32, "
          f"{args.threads} threads; {args.steps} timed steps of each in turns after "
          f"{args.warmup} warm-up; host_malloc {args.host_malloc}; jax {jax.__version__}, "
          f"torch {torch.__version__}")
    print(f"{os.cpu_count()} CPUs, 1-min load average {load:.1f} before timing, "
          f"{os.getloadavg()[0]:.1f} after; matmul peak ({args.peak_size}^2 f32, median): "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    print(f"{'':28s} {'img/s':>6s} {'step s':>6s} {'(min-max)':>12s} {'CPU s':>6s} {'faults':>7s} "
          f"{'ctx tok':>7s} {'tgt tok':>7s} {'matmul GFLOP/img':>16s} {'% peak':>6s} "
          f"{'XLA GFLOP/img':>13s}")
    rate = {}
    for run in runs:
        wall, cpu, faults = zip(*times[run.name])
        med = statistics.median(wall)
        rate[run.name] = args.batch / med
        ctx, tgt = run.tokens()
        peak = peaks[run.framework]
        xla = f"{run.xla_flops / 1e9:13.2f}" if isinstance(run, Ours) else f"{'-':>13s}"
        print(f"{run.name:28s} {rate[run.name]:6.2f} {med:6.2f} {min(wall):5.2f}-{max(wall):<6.2f} "
              f"{statistics.median(cpu):6.2f} {statistics.median(faults):7.0f} {ctx:7.1f} {tgt:7.1f} {run.flops / 1e9:16.2f} "
              f"{run.flops * args.batch / med / peak:6.1%} {xla}")
    ours = [r for r in runs if isinstance(r, Ours)]
    print(f"ours: valid tokens per image (ctx, tgt) {ours[0].valid[0]:.1f}, {ours[0].valid[1]:.1f} "
          f"of {ours[0].slots[0]}, {ours[0].slots[1]} slots (masks.max_context={caps[0]}, "
          f"masks.max_target={caps[1]})")
    if args.ijepa_dir:
        ref_rate = rate[runs[0].name]
        (rc, rt), (oc, ot) = runs[0].tokens(), ours[0].tokens()
        print(f"ours I-JEPA / reference: images/s x{rate[ours[0].name] / ref_rate:.2f}, "
              f"matmul FLOPs x{ours[0].flops / runs[0].flops:.2f}, tokens per image "
              f"ctx x{oc / rc:.2f} tgt x{ot / rt:.2f}")
    ij = ours[0]
    for tc in ours[1:]:
        label = tc.name.replace("ours, ", "").replace(" mode", "")
        print(f"{label} / I-JEPA (ours): step time x{rate[ij.name] / rate[tc.name]:.2f}, matmul "
              f"FLOPs x{tc.flops / ij.flops:.2f}, XLA FLOPs x{tc.xla_flops / ij.xla_flops:.2f}")


if __name__ == "__main__":
    main()
