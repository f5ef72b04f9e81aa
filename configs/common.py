"""Shared defaults for every tcjepa_jax config.

A config file imports `get_base_config()` and overrides what its experiment needs. Every choice
docs/method.md calls open is a field here, so a sweep can change it.
"""

import ml_collections

from tcjepa_jax import sweeps

from tcjepa_jax.models.vit import vit_config


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "base"
    config.seed = 0

    # ---- Run length and bookkeeping ----------------------------------------------------------
    config.batch_size = 2048            # global, over all hosts
    # Gradients of grad_accum micro-batches of batch_size / grad_accum are summed inside the
    # step, exactly as one step on the whole batch (less memory; EMA and schedules per step).
    config.grad_accum = 1
    config.total_steps = 1000
    config.log_every = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3         # the newest N checkpoints are kept...
    config.keep_period = 0              # ...and every keep_period-th step's for good (0: none)
    # A NaN or Inf in the loss or the gradients (checked inside the step, every step): "stop"
    # ends the run naming the step and the last good checkpoint; "skip" leaves parameters, EMA
    # and optimizer state untouched for that step, counts it, and stops after max_skips_in_a_row
    # such steps in a row. Either way no non-finite value reaches the parameters (the step
    # counter and the data do move on), and the host notices at its next metrics fetch or
    # checkpoint save, never saving past a stop (docs/reliability.md).
    config.nonfinite = ml_collections.ConfigDict()
    config.nonfinite.action = "stop"
    config.nonfinite.max_skips_in_a_row = 10
    # Start from another run's weights (a workdir with checkpoints): its context and target
    # encoders (and, with predictor=True, its predictor and text encoder), not its optimizer
    # state or step. step = 0 takes its latest checkpoint. Shapes must match this config's.
    config.init_from = ml_collections.ConfigDict()
    config.init_from.workdir = ""
    config.init_from.step = 0
    config.init_from.predictor = False
    # MFU = achieved FLOP/s (XLA's count of the compiled step) / this per-device peak; 0 takes
    # the chip's bf16 peak from tcjepa_jax/chips.py (no MFU for chips it does not list, e.g. CPUs).
    config.peak_flops_per_device = 0.0
    # A jax.profiler trace of steps [first_step, first_step + num_steps) into the TensorBoard
    # directory (process 0); num_steps = 0 turns it off.
    config.profile = ml_collections.ConfigDict()
    config.profile.first_step = 0
    config.profile.num_steps = 0
    # Python calls in the trace: jax's Python tracer hooks every thread of the process, and
    # with it on a CI run once crashed (segfault) inside the trace window; off, the trace still
    # has the host and device timelines.
    config.profile.python_tracer = False
    # glibc's malloc on the host (tcjepa_jax/host_memory.py): "reuse" keeps the memory XLA's
    # CPU runtime frees after a step for the next one instead of returning it to the kernel,
    # which would zero-fill it again on first touch (22% of a ViT-Ti CPU step); "system"
    # leaves glibc's defaults and MALLOC_* environment variables alone.
    config.host_malloc = "reuse"

    # ---- Input (docs/data.md) -----------------------------------------------------------------
    config.input = ml_collections.ConfigDict()
    # A file in tcjepa_jax/data/sources/: synthetic | array_record | tfds.
    config.input.source = "synthetic"
    config.input.split = "train"        # tfds: the training split, e.g. "train[:99%]"
    # array_record: a directory of shards, a glob, or several of them comma-separated;
    # tfds: the TFDS data_dir ("" = TFDS's default).
    config.input.data_dir = ""
    config.input.tfds_name = ""         # tfds: e.g. "imagenet2012", "coco_captions"
    config.input.image_key = "image"    # tfds: feature names; "/" reaches nested features
    config.input.caption_key = ""       # tfds: text or sequence-of-text feature ("" = none)
    config.input.id_key = ""            # tfds: image id / file name feature (joins caption_file)
    config.input.label_key = ""         # tfds: integer label feature ("" = none)
    # JSONL, one {"id": ..., "captions": [...]} per line, joined on the record id; replaces the
    # captions stored in the data. "" = use the data's own captions.
    config.input.caption_file = ""
    # A record without usable captions is skipped and counted (True) or trains unconditioned
    # (False). Ignored in I-JEPA mode, which reads no text.
    config.input.skip_uncaptioned = True
    # own | shuffled: the control run, each image conditioned on the captions of another image
    # of its batch (caption_control.py). Ignored in I-JEPA mode.
    config.input.caption_control = "own"
    config.input.image_size = 224
    config.input.crop_scale = (0.3, 1.0)
    config.input.num_captions = 8       # N captions sampled per image per step
    config.input.max_caption_len = 64   # S tokens per caption
    config.input.synthetic_size = 1_000_000
    config.input.seed = 0               # the synthetic dataset itself; config.seed drives training
    # Objects per synthetic scene, drawn uniformly in [min, max]: the scenes' difficulty (the
    # shape probe reads the largest object, harder to pick out among more objects).
    config.input.min_objects = 1
    config.input.max_objects = 4
    config.input.object_scale = 1.0     # object radii, relative to the default sizes
    # textured (a random texture, brightness and tint per scene) | plain (one grey): with plain
    # backgrounds only the objects vary between images.
    config.input.background = "textured"
    # Decoding and transforms run in this many Grain worker processes (0: in the training
    # process), each with num_threads reader threads; prefetch is in batches.
    config.input.workers = 0
    config.input.num_threads = 2
    config.input.prefetch = 2

    config.tokenizer = ml_collections.ConfigDict()
    # SentencePiece model with T5 ids (pad 0, eos 1, unk 2), e.g. T5's spiece.model; "" trains
    # one on the training captions into the workdir at start-up.
    config.tokenizer.model_path = ""
    config.tokenizer.vocab_size = 1000  # used only when training a tokenizer

    # ---- Masks (docs/method.md, I-JEPA defaults) -----------------------------------------
    config.masks = ml_collections.ConfigDict()
    config.masks.num_targets = 4
    config.masks.target_scale = (0.15, 0.2)
    config.masks.target_aspect = (0.75, 1.5)
    config.masks.context_scale = (0.85, 1.0)
    config.masks.context_aspect = (1.0, 1.0)
    config.masks.min_keep = 10
    config.masks.max_context = 0       # cap on context slots (0: the exact bound); see masks.py
    # Cap on slots per target block (0: the exact bound); a longer block keeps a uniformly
    # random subset of its patches as targets (masks.py). Paper configs set both caps.
    config.masks.max_target = 0

    # ---- Model -----------------------------------------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.encoder = "B/16"       # VIT_SIZES name / patch size
    # Recompute blocks in the backward pass: none | full | dots_saveable |
    # dots_with_no_batch_dims_saveable (models/layers.py REMAT_POLICIES).
    config.model.remat = "none"
    # nn.scan over the layers of the encoder, the predictor and the text encoder: one layer is
    # compiled instead of all (compile time); parameters are stacked on a "layers" axis, so a
    # checkpoint restores only into the layout it was written with.
    config.model.scan_layers = False
    config.model.predictor_width = 384
    config.model.predictor_depth = 6
    config.model.predictor_heads = 12   # docs/method.md: equal to the encoder's
    # The paper's ablations (docs/method.md): all | first | caption | none (= I-JEPA).
    config.model.conditioning = "all"
    config.model.cond_mlp_ratio = 1.0   # the conditioner's "light" MLP
    # Where that MLP runs (the paper is ambiguous): per_caption (on each caption's result, then
    # the max-pool) | after_pool (once on the pooled token: N times less MLP work; another model).
    config.model.cond_mlp = "per_caption"
    # How the per-caption cross-attention is computed, the same function either way (to float
    # rounding): shared (one product of the queries with all captions' words, softmax per
    # caption) | broadcast (the queries copied once per caption). docs/method.md, section 9.
    config.model.cond_attention = "shared"
    # What the max over captions pools: outputs (each caption's token after the out-projection,
    # the paper's reading) | attention (the per-caption attention outputs, then one
    # out-projection per token: N times less projection work; another model; needs
    # cond_mlp="after_pool"). docs/method.md, section 9.
    config.model.cond_pool = "outputs"
    config.model.text = "base"          # T5_SIZES name
    # A pretrained T5 v1.1 encoder, a Hugging Face folder (config.json, model.safetensors or
    # pytorch_model.bin, spiece.model; docs/method.md): its weights replace the random init, its
    # spiece.model is the tokenizer; model.text must name its size. "" = random init.
    config.model.text_checkpoint = ""
    config.model.text_trainable = False
    # > 0: T5 runs on this many rows of input.max_caption_len tokens per image, the valid
    # captions packed whole into them, instead of one padded row per caption (the same features;
    # a batch whose captions do not fit runs padded). 0, or >= input.num_captions: off.
    # docs/method.md, section 9.
    config.model.text_pack_rows = 0
    # Where the frozen T5's word features come from: compute (T5 runs in every step) |
    # precomputed (read from the records: shards written by make_dataset --text_checkpoint with
    # model.text_checkpoint's T5, model.text and input.max_caption_len, which the run checks;
    # no T5 in the step or the train state). docs/method.md, section 9; docs/data.md.
    config.model.text_features = "compute"
    # Rows of the text embedding table; 0 = the tokenizer's size. A pretrained T5 has 32128.
    config.model.text_vocab_size = 0
    config.model.dtype = "bfloat16"     # compute dtype; parameters stay float32
    # The ViT's and the predictor's self-attention, the same function every way: auto (einsum
    # on CPU, cuDNN flash attention on GPU, the Pallas splash kernel on TPU where it needs no
    # padding, else xla) | einsum | xla (jax.nn.dot_product_attention) | cudnn | splash (that
    # kernel where it applies, xla elsewhere). models/attention.py, docs/performance.md.
    config.model.attention = "auto"

    # ---- Loss (docs/method.md) ------------------------------------------------------------
    config.loss = ml_collections.ConfigDict()
    config.loss.pred = "smooth_l1"      # smooth_l1 (I-JEPA code) | l2 (per-patch L2 norm, paper)
    config.loss.sparse_weight = 0.1     # lambda
    config.loss.consistency_weight = 0.5  # beta
    # The map lambda and beta act on (models/penalties.py, docs/method.md section 8): cosine
    # (the paper's rectified cosine; dies once every cosine is negative) | standardized (the
    # cosines standardised over the caption's words) | attention (the attention's entropy).
    config.loss.penalty = "cosine"
    # LayerNorm eps of the targets; the I-JEPA reference's F.layer_norm default (its encoder and
    # predictor use 1e-6, as here).
    config.loss.target_norm_eps = 1e-5

    # ---- Optimisation (docs/method.md) ----------------------------------------------------
    config.optim = ml_collections.ConfigDict()
    config.optim.lr_start = 1e-4
    config.optim.lr_peak = 1e-3
    config.optim.lr_end = 1e-6
    config.optim.warmup_steps = 100
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.wd_start = 0.04
    config.optim.wd_end = 0.4
    config.optim.ema_start = 0.996
    config.optim.ema_end = 1.0
    # Adam's first moment in bfloat16 halves its memory ("float32" or "bfloat16"); optax keeps
    # the second moment in the parameters' float32.
    config.optim.mu_dtype = "float32"

    # ---- Sharding ------------------------------------------------------------------------------
    # Mesh axes and sizes; -1 takes the remaining devices. The batch is split over data x fsdp;
    # `tensor` (optional, size 1 if absent) splits heads and MLP units. DP: (("data", -1),
    # ("fsdp", 1)); FSDP: (("data", 1), ("fsdp", -1)); FSDP+TP: add ("tensor", 2..8).
    config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    # Multi-slice TPU (HSDP): the data axis spans this many slices over the data-center network.
    config.mesh_slices = 1
    # Logical axis -> mesh axis (None = replicated), for parameters (and so optimizer state) and
    # activations (act_*). A dimension that the mesh axis does not divide is replicated instead.
    config.sharding_rules = (
            ("embed", "fsdp"), ("text_embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
            ("kv", None), ("vocab", None), ("patch", None), ("relpos_buckets", None),
            ("layers", None),
            ("act_batch", ("data", "fsdp")), ("act_len", None), ("act_embed", None),
            ("act_mlp", "tensor"), ("act_heads", "tensor"), ("act_kv", None),
    )

    # ---- Health monitors (tcjepa_jax/monitors.py) --------------------------------------------
    config.monitor = ml_collections.ConfigDict()
    # Target-feature std and effective rank, predictor std, prediction-target cosine, every step.
    config.monitor.enabled = True
    # Warn when the target features' std or effective rank falls below this fraction of its
    # first logged value (0: never).
    config.monitor.collapse_fraction = 0.2

    # ---- Evaluation ----------------------------------------------------------------------------
    # Evaluators of the frozen encoder (tcjepa_jax/evaluation.py), run at the end of training,
    # every `every` steps during it (0: only at the end), and by tcjepa_jax.evaluate.
    config.probe = ml_collections.ConfigDict()
    config.probe.enabled = True
    # Files of tcjepa_jax/evaluators/: linear | knn | dense | attentive (dense needs per-pixel
    # labels: the synthetic scenes, or a TFDS set with probe.segmentation_key) | grounding
    # (the synthetic scenes only).
    config.probe.evaluators = ("linear", "knn", "dense", "attentive")
    config.probe.every = 0
    config.probe.encoder = "target"     # target (EMA) | context
    # Probe data: by default the training source; these override config.input's fields.
    config.probe.source = ""
    config.probe.data_dir = ""
    config.probe.tfds_name = ""
    config.probe.label_key = ""
    # TFDS only: the feature holding a per-pixel class mask for the dense evaluator (an Image of
    # shape (H, W, 1) or with equal channels, or an integer Tensor (H, W)), e.g.
    # "segmentation_mask" of oxford_iiit_pet; cropped like the image, resized nearest-neighbour.
    # "" = no mask. Without label_key only the dense evaluator can run.
    config.probe.segmentation_key = ""
    # Pixels of this class neither train nor score the dense probe (255: the VOC/Cityscapes
    # convention; 0 for ADE20k-style "unlabelled"; 3 for the pets' trimap border).
    config.probe.segmentation_ignore = 255
    config.probe.train_split = "validation"   # the probes' training images
    config.probe.test_split = "test"
    config.probe.num_train = 2000
    config.probe.num_test = 1000
    # Image-level tasks of the synthetic scenes (other sources: their "label").
    config.probe.tasks = ("count", "shape", "color")
    config.probe.batch_size = 256
    config.probe.knn_k = 20             # DINO's protocol
    config.probe.knn_temperature = 0.07
    config.probe.dense_images = 500     # images whose patches train the dense probe
    config.probe.attentive_steps = 200
    config.probe.attentive_lr = 1e-3
    # grounding (synthetic scenes, conditioned runs): held-out scenes whose patches' attention
    # to the words naming their object is measured (docs/evaluation.md).
    config.probe.grounding_images = 200
    return config


def epochs_to_steps(epochs: float, num_examples: int, batch_size: int) -> int:
    return int(round(epochs * num_examples / batch_size))


# ---- Paper runs (docs/method.md) ----------------------------------------------------------

# Examples per epoch of the paper's datasets.
DATASET_SIZES = {
    "imagenet2012": 1_281_167,
    "imagenet21k": 13_153_500,          # the winter-2021 "fall11" release used by timm/big_vision
    "cc12m_yfcc15m": 27_000_000,        # CC12M + YFCC15M as available; set to your copy's size
}
PREDICTOR_DEPTH = {"B": 6, "L": 12, "H": 12, "G": 16}

# Where each paper dataset is read from; the config files' docstrings give the commands that
# prepare the data (docs/data.md has the details). Paths are relative to the working directory;
# override them with --config.input.data_dir=... / --config.input.caption_file=...
PAPER_DATA = {
    "imagenet2012": dict(source="tfds", tfds_name="imagenet2012", id_key="file_name",
                         label_key="label", caption_file="data/captions/imagenet2012_train.jsonl"),
    "imagenet21k": dict(source="array_record", data_dir="data/imagenet21k"),
    "cc12m_yfcc15m": dict(source="array_record", data_dir="data/cc12m,data/yfcc15m"),
}


def paper_config(arg: str, *, name: str, encoder: str, dataset: str, epochs: int,
                 warmup_epochs: int, lr_start: float = 1e-4) -> ml_collections.ConfigDict:
    """One paper run. `arg` (comma separated): `ijepa` = the I-JEPA baseline of the same run,
    `runlocal` = the same recipe shrunk to run on a laptop CPU in about a minute on the
    synthetic scenes; `sweep=NAME` picks the ablation get_sweep returns (paper_sweep)."""
    args = {a for a in (arg or "").split(",") if a and not a.startswith("sweep=")}
    unknown = args - {"ijepa", "runlocal"}
    if unknown:
        raise ValueError(f"unknown config arguments {sorted(unknown)}; use ijepa and/or runlocal.")
    config = get_base_config()
    config.name = name + ("_ijepa" if "ijepa" in args else "") + ("_runlocal" if "runlocal" in args else "")
    size = encoder.split("/")[0]

    config.batch_size = 2048
    config.total_steps = epochs_to_steps(epochs, DATASET_SIZES[dataset], config.batch_size)
    config.optim.warmup_steps = epochs_to_steps(warmup_epochs, DATASET_SIZES[dataset],
                                                config.batch_size)
    config.optim.lr_start = lr_start
    config.checkpoint_every = 2000
    config.log_every = 100

    config.input.update(PAPER_DATA[dataset])
    if "ijepa" in args:
        config.input.caption_file = ""  # I-JEPA reads no text
    config.input.image_size = 224
    config.input.workers = 8            # decoding processes per host; size to the host's cores
    # Context / per-target-block slot caps: about the tokens per image the I-JEPA reference
    # processes at its 128 images per device (docs/method.md, section 4), for 224 px with patch
    # 16 (14x14 grid; exact bounds 171 / 42) or 14 (16x16; 221 / 56). Rescale for other sizes.
    grid = config.input.image_size // vit_config(encoder)["patch_size"]
    config.masks.max_context, config.masks.max_target = {14: (54, 36), 16: (72, 48)}[grid]

    config.model.encoder = encoder
    config.model.predictor_depth = PREDICTOR_DEPTH[size]
    config.model.predictor_heads = vit_config(encoder)["num_heads"]  # docs/method.md: as the encoder
    config.model.remat = "full" if size in ("H", "G") else "none"
    config.model.text = "base"          # T5 size is not stated in the paper (docs/method.md)
    config.model.conditioning = "none" if "ijepa" in args else "all"
    config.mesh = ((("data", 1), ("fsdp", -1), ("tensor", 1)) if size in ("H", "G")
                   else (("data", -1), ("fsdp", 1), ("tensor", 1)))
    config.probe.enabled = False        # the probes below are for the synthetic scenes

    if "runlocal" in args:
        config.input.source = "synthetic"
        config.input.workers = 0
        config.input.image_size = 64
        config.input.num_captions = 4
        config.input.max_caption_len = 24
        config.tokenizer.vocab_size = 256
        config.batch_size = 16
        config.total_steps = 30
        config.optim.warmup_steps = 5
        config.log_every = 10
        config.checkpoint_every = 30
        config.model.encoder = "mu/8"
        config.model.predictor_width = 96
        config.model.predictor_depth = 2
        config.model.predictor_heads = 3
        config.model.text = "tiny"
        config.model.dtype = "float32"
        config.model.remat = "none"
        config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    return config


# ---- The paper's ablations as sweeps (python launch/sweep.py, docs/launch.md) ------------------

# Target-block scale ranges from small to large blocks; (0.15, 0.2) is the I-JEPA default.
MASK_SCALES = ((0.05, 0.1), (0.1, 0.15), (0.15, 0.2), (0.2, 0.3))

PAPER_SWEEPS = {
    # Where the predictor reads the captions: every layer, the first only, one pooled caption
    # vector, or nowhere (I-JEPA).
    "conditioning": lambda: sweeps.axis("model.conditioning", ["all", "first", "caption", "none"]),
    # The sparsity penalty's and the consistency term's weights, lambda and beta, each on / off.
    "penalties": lambda: sweeps.product(sweeps.axis("loss.sparse_weight", [0.0, 0.1]),
                                        sweeps.axis("loss.consistency_weight", [0.0, 0.5])),
    # The prediction loss: smooth-L1 (the I-JEPA code) or the paper's per-patch L2.
    "loss": lambda: sweeps.axis("loss.pred", ["smooth_l1", "l2"]),
    # Mask-scale sensitivity, TC-JEPA against I-JEPA (the paper predicts a flatter curve for
    # TC-JEPA). Larger blocks than masks.max_target are subsampled (docs/method.md).
    "mask_scales": lambda: sweeps.product(sweeps.axis("model.conditioning", ["all", "none"]),
                                          sweeps.axis("masks.target_scale", list(MASK_SCALES))),
}


def paper_sweep(arg: str) -> list:
    """get_sweep of the paper configs: `sweep=NAME` in the config argument picks one of
    PAPER_SWEEPS (default: conditioning), e.g. configs/in1k_vit_b16.py:sweep=penalties."""
    names = [a.split("=", 1)[1] for a in (arg or "").split(",") if a.startswith("sweep=")]
    name = names[-1] if names else "conditioning"
    if name not in PAPER_SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; choose one of {sorted(PAPER_SWEEPS)}.")
    return PAPER_SWEEPS[name]()
