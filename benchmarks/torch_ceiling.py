"""The supervised ceiling of benchmarks/supervised_ceiling.py, in PyTorch: is a slow task slow
because of our code, or because of the architecture?

    python benchmarks/torch_ceiling.py --model=timm|cnn [--config=configs/study_synthetic.py[:ARGS]] \
        [--steps=2000] [--lr=2e-3] [--batch=64] [--config.probe.num_train=8000 ...]

`timm`: timm's VisionTransformer of the config's encoder size and patch (no class token, mean
pooling, our fixed 2-D sin-cos position embedding, final LayerNorm), an independent
implementation of the same model. `cnn`: three 3x3 convolutions (32, 64, 96 channels) with ReLU
and 2x2 max pooling, the inductive-bias reference. Everything else is supervised_ceiling.py's:
the same probe images and labels, one linear head per task on the mean-pooled features, summed
cross-entropies, AdamW (weight decay 0.05, warm-up 50 steps or a tenth, cosine to 0), random
batches, and the same printed lines.
"""

import functools
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tcjepa_jax.evaluators._features import load_split, tasks_of  # noqa: E402
from tcjepa_jax.models.vit import sincos_2d, vit_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs",
                                                                   "study_synthetic.py"),
                                          "Config file (the encoder, images and probe sets).")
_MODEL = flags.DEFINE_enum("model", "timm", ["timm", "cnn"], "the PyTorch model to train")
_STEPS = flags.DEFINE_integer("steps", 2000, "training steps")
_LR = flags.DEFINE_float("lr", 2e-3, "peak learning rate")
_BATCH = flags.DEFINE_integer("batch", 64, "images per step")
_EVAL_POINTS = flags.DEFINE_integer("eval_points", 4, "test evaluations, evenly spaced")
_THREADS = flags.DEFINE_integer("threads", 0, "torch threads (0: torch's default)")


class PooledTimmViT(torch.nn.Module):
    """timm's ViT as our encoder is configured; returns mean-pooled final-LN tokens (B, D)."""

    def __init__(self, variant: str, image_size: int):
        super().__init__()
        import timm  # the test extras; not needed by the cnn
        v = vit_config(variant)
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=image_size, patch_size=v["patch_size"], embed_dim=v["width"],
            depth=v["depth"], num_heads=v["num_heads"], mlp_ratio=v["mlp_ratio"], num_classes=0,
            class_token=False, global_pool="", norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
        grid = image_size // v["patch_size"]
        self.vit.pos_embed.data = torch.from_numpy(sincos_2d(grid, grid, v["width"]))[None]
        self.vit.pos_embed.requires_grad_(False)
        self.width = v["width"]

    def forward(self, images):
        return self.vit.forward_features(images).mean(1)


class PooledCNN(torch.nn.Module):
    width = 96

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for out in (32, 64, self.width):
            layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.ReLU(),
                       torch.nn.MaxPool2d(2)]
            channels = out
        self.net = torch.nn.Sequential(*layers)

    def forward(self, images):
        return self.net(images).mean((2, 3))


def main(argv):
    del argv
    config = _CONFIG.value
    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    torch.manual_seed(0)
    tasks = list(tasks_of(config))
    train = load_split(config, config.probe.get("train_split", "train"), config.probe.num_train)
    test = load_split(config, config.probe.get("test_split", "test"), config.probe.num_test)
    classes = {t: int(max(train["labels"][t].max(), test["labels"][t].max())) + 1 for t in tasks}
    to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    x_train, x_test = to_nchw(train["image"]), to_nchw(test["image"])
    y_train = {t: torch.from_numpy(train["labels"][t].astype(np.int64)) for t in tasks}
    encoder = (PooledTimmViT(config.model.encoder, config.input.image_size)
               if _MODEL.value == "timm" else PooledCNN())
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(encoder.width, classes[t]) for t in tasks})
    for head in heads.values():
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)
    params = [p for p in [*encoder.parameters(), *heads.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=_LR.value, weight_decay=0.05)
    steps, warmup = _STEPS.value, min(50, max(1, _STEPS.value // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup)
                                                                  / max(1, steps - warmup))))

    @torch.no_grad()
    def accuracy():
        encoder.eval()
        hits = dict.fromkeys(tasks, 0)
        for i in range(0, len(x_test), 250):
            pooled = encoder(x_test[i:i + 250])
            for t in tasks:
                pred = heads[t](pooled).argmax(-1).numpy()
                hits[t] += int((pred == test["labels"][t][i:i + 250]).sum())
        encoder.train()
        return " ".join(f"{t} {hits[t] / len(x_test):.3f}" for t in tasks)

    name = f"timm ViT {config.model.encoder}" if _MODEL.value == "timm" else "CNN"
    print(f"{name} at {config.input.image_size} px, "
          f"{len(x_train)} training / {len(x_test)} test images, classes {classes}, batch "
          f"{_BATCH.value}, lr {_LR.value}, {torch.get_num_threads()} threads", flush=True)
    print(f"step 0 (init): {accuracy()}", flush=True)
    rng, start = np.random.default_rng(0), time.time()
    every = max(1, steps // max(1, _EVAL_POINTS.value))
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(x_train), _BATCH.value))
        pooled = encoder(x_train[idx])
        loss = sum(torch.nn.functional.cross_entropy(heads[t](pooled), y_train[t][idx])
                   for t in tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % every == 0 or step == steps:
            print(f"step {step}: loss {loss.item():.3f} | test {accuracy()} | "
                  f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
