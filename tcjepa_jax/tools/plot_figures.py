"""The matplotlib figures of tools/plot.py (headless: Figure objects, no pyplot, Agg output)."""

from __future__ import annotations

import io
import math
import os
import re
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from tcjepa_jax import paths
from tcjepa_jax.config_lib import UserError
from tcjepa_jax.data.tokenizer import EOS_ID
from tcjepa_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CONTEXT_COLOR = "#1f77b4"
TARGET_COLORS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                 "#17becf")
GREY = (0.55, 0.55, 0.55, 1.0)


def _suptitle(fig: Figure, text: str, fontsize: float):
    """A figure title wrapped to the figure's width."""
    chars = max(int(fig.get_figwidth() * 72 / (0.55 * fontsize)), 40)
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in text.split("\n")),
                 fontsize=fontsize)


def save(fig: Figure, path: str) -> str:
    """PNG of `fig` at `path` (a local path or a gs:// URL)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    if paths.is_url(path):
        from etils import epath
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        epath.Path(path).write_bytes(buffer.getvalue())
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
    return path


# ---- Masks ------------------------------------------------------------------------------------

def display_image(image: np.ndarray) -> np.ndarray:
    """A normalised image (S, S, 3) back to RGB in [0, 1]."""
    return np.clip(np.asarray(image) * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


def _patch_set(idx, valid, num_patches: int) -> np.ndarray:
    out = np.zeros(num_patches, bool)
    out[np.asarray(idx)[np.asarray(valid).astype(bool)]] = True
    return out


def _outline(ax, cells: np.ndarray, patch: tuple, color, width=1.8):
    """The boundary of a set of grid cells (gh, gw) bool, in pixels."""
    gh, gw = cells.shape
    padded = np.pad(cells, 1)
    segments = []
    for r, c in zip(*np.nonzero(cells)):
        y0, x0, y1, x1 = r * patch[0], c * patch[1], (r + 1) * patch[0], (c + 1) * patch[1]
        if not padded[r, c + 1]:
            segments.append([(x0, y0), (x1, y0)])       # top
        if not padded[r + 2, c + 1]:
            segments.append([(x0, y1), (x1, y1)])       # bottom
        if not padded[r + 1, c]:
            segments.append([(x0, y0), (x0, y1)])       # left
        if not padded[r + 1, c + 2]:
            segments.append([(x1, y0), (x1, y1)])       # right
    ax.add_collection(LineCollection(segments, colors=[color], linewidths=width))


def _tint(ax, cells: np.ndarray, color, alpha: float, size: int):
    rgba = np.zeros(cells.shape + (4,))
    rgba[cells] = (*_rgb(color), alpha)
    ax.imshow(rgba, interpolation="nearest", extent=(0, size, size, 0))


def _rgb(color: str):
    return tuple(int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))


def draw_masks(ax, example: dict, grid: tuple):
    """An image with its context tinted blue and each target block tinted and outlined in its
    colour; only valid slots count (a capped block or context shows only its kept patches)."""
    image = display_image(example["image"])
    size = image.shape[0]
    patch = (size // grid[0], size // grid[1])
    num_patches = grid[0] * grid[1]
    ax.imshow(image, interpolation="nearest", extent=(0, size, size, 0))
    context = _patch_set(example["context_idx"], example["context_valid"], num_patches)
    _tint(ax, context.reshape(grid), CONTEXT_COLOR, 0.45, size)
    counts = []
    for k in range(example["target_idx"].shape[0]):
        cells = _patch_set(example["target_idx"][k], example["target_valid"][k],
                           num_patches).reshape(grid)
        color = TARGET_COLORS[k % len(TARGET_COLORS)]
        _tint(ax, cells, color, 0.25, size)
        _outline(ax, cells, patch, color)
        counts.append(int(cells.sum()))
    ax.set_xlim(0, size)
    ax.set_ylim(size, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return int(context.sum()), counts


def masks_figure(run) -> Figure:
    batch, models, config = run.batch, run.experiment.models, run.config
    n = batch["image"].shape[0]
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.5 * cols, 2.6 * rows + 1.1), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        n_ctx, n_tgt = draw_masks(ax, {k: v[i] for k, v in batch.items()}, models.grid)
        ax.set_title(f"#{i}: context {n_ctx}, targets {'/'.join(map(str, n_tgt))}", fontsize=8)
    spec = models.mask_spec
    k = spec.num_targets
    handles = [Patch(color=CONTEXT_COLOR, alpha=0.6, label="context")] + [
        Patch(facecolor=TARGET_COLORS[j % len(TARGET_COLORS)], label=f"target {j + 1}")
        for j in range(k)]
    fig.legend(handles=handles, loc="outside lower center", ncol=k + 1, fontsize=8)
    size = config.input.image_size
    _suptitle(fig,
        f"Training masks of {config.get('name', 'the run')}: the first {n} examples of its "
        f"training stream, as training built them\n{models.grid[0]}x{models.grid[1]} patches of "
        f"{size // models.grid[0]} px; {spec.num_context_slots} context slots, {k} target blocks "
        f"of {spec.num_target_slots} slots (padded slots not shown); counts are valid patches", 9)
    return fig


# ---- O maps -----------------------------------------------------------------------------------

def patch_maps(values: np.ndarray, example: dict, num_patches: int):
    """Per-token values (L, T, S) of one caption -> per-patch (L, P, S), NaN where no token.

    Tokens are laid out as in the predictor: per target block k, the context slots then that
    block's target slots. A target patch takes the mean of the mask tokens at it (over the blocks
    covering it); a context patch the mean of its context token over the K sequences."""
    k, nt = example["target_idx"].shape
    nc = example["context_idx"].shape[0]
    v = values.reshape(values.shape[0], k, nc + nt, values.shape[-1])
    sums = np.zeros((values.shape[0], num_patches, values.shape[-1]))
    counts = np.zeros(num_patches)
    target = np.zeros(num_patches, bool)
    for block in range(k):
        ok = example["target_valid"][block]
        idx = example["target_idx"][block][ok]
        np.add.at(sums, (slice(None), idx), v[:, block, nc:][:, ok])
        np.add.at(counts, idx, 1)
        target[idx] = True
    slots = np.flatnonzero(example["context_valid"].astype(bool))
    idx = example["context_idx"][slots]
    keep = ~target[idx]  # never both, by construction; the mask tokens would win
    np.add.at(sums, (slice(None), idx[keep]), v[:, :, slots[keep]].mean(1))
    np.add.at(counts, idx[keep], 1)
    with np.errstate(invalid="ignore"):
        return np.where(counts[None, :, None] > 0, sums / np.maximum(counts, 1)[None, :, None],
                        np.nan)


def caption_words(tokenizer, ids, mask) -> list[str]:
    """One label per valid token of a caption: its piece as text (\u2581 for a lone word
    boundary, </s> for the end token)."""
    words = []
    for i in np.asarray(ids)[np.asarray(mask).astype(bool)]:
        words.append("</s>" if i == EOS_ID else (tokenizer.decode([i]) or "\u2581"))
    return words


def o_figure(run, o, image: int, caption: int, kind: str, max_words: int) -> Figure:
    """Rows: conditioned predictor layers; columns: the image's training mask, then one heat map
    per word of the caption (kind "o": O = max(0, cos); "cos": cos(Q, K) itself)."""
    models, tokenizer = run.experiment.models, run.experiment.tokenizer
    ex = {key: v[image] for key, v in run.batch.items()}
    grid, num_patches = models.grid, models.grid[0] * models.grid[1]
    ids, mask = ex["text_ids"][caption], ex["text_mask"][caption].astype(bool)
    words = caption_words(tokenizer, ids, mask)
    values = o.cos[:, caption][..., mask]                               # (L, T, S')
    if kind == "o":
        values = np.maximum(values, 0.0)
    maps = patch_maps(values, ex, num_patches)                           # (L, P, S')
    k, nt = ex["target_idx"].shape
    token_valid = np.concatenate([np.concatenate([ex["context_valid"], ex["target_valid"][b]])
                                  for b in range(k)]).astype(bool)
    shown = min(len(words), max_words)
    layers = len(o.layers)
    finite = maps[np.isfinite(maps)]
    if kind == "o":
        top = float(finite.max(initial=0.0))
        cmap, vmin, vmax = "magma", 0.0, top if top > 0 else 1.0
    else:
        lim = max(float(np.abs(finite).max(initial=0.0)), 1e-6)
        cmap, vmin, vmax = "RdBu_r", -lim, lim

    size = ex["image"].shape[0]
    gray = display_image(ex["image"]).mean(-1)
    target = np.zeros(num_patches, bool)
    for b in range(k):
        target |= _patch_set(ex["target_idx"][b], ex["target_valid"][b], num_patches)
    patch = (size // grid[0], size // grid[1])
    fig = Figure(figsize=(1.5 * (shown + 1) + 1.4, 1.5 * layers + 1.3), layout="constrained")
    axes = fig.subplots(layers, shown + 1, squeeze=False)
    colormap = colormaps[cmap].with_extremes(bad=GREY)
    im = None
    for row, layer in enumerate(o.layers):
        draw_masks(axes[row, 0], ex, grid)
        o_row = np.maximum(o.cos[row, caption][token_valid][:, mask], 0.0)
        axes[row, 0].set_ylabel(f"cond. layer {row}\n(predictor layer {layer})\nmean O "
                                f"{o_row.mean():.3g}\nO>0: {(o_row > 0).mean():.1%}",
                                fontsize=8)
        for col in range(shown):
            ax = axes[row, col + 1]
            ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=(0, size, size, 0))
            im = ax.imshow(np.ma.masked_invalid(maps[row, :, col].reshape(grid)), cmap=colormap,
                           vmin=vmin, vmax=vmax, alpha=0.85, interpolation="nearest",
                           extent=(0, size, size, 0))
            _outline(ax, target.reshape(grid), patch, "white", width=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(words[col], fontsize=9)
        axes[row, 0].set_xticks([])
        axes[row, 0].set_yticks([])
    axes[0, 0].set_title("training mask", fontsize=9)
    fig.colorbar(im, ax=axes[:, 1:], shrink=0.9, fraction=0.03, pad=0.01,
                 label="O = max(0, cos(Q, K))" if kind == "o" else "cos(Q, K)")
    text = tokenizer.decode(ids)
    more = f" (first {shown} of {len(words)} tokens)" if shown < len(words) else ""
    what = ("O = max(0, cos(Q_i, K_s))" if kind == "o"
            else "cos(Q_i, K_s) before the rectification of O")
    note = ""
    if kind == "o" and not finite.max(initial=0.0) > 0:
        note = ("\nO is 0 at every patch and word of this caption: all their cosines are <= 0 "
                "(the dead zone of the penalties, docs/method.md section 8); --cosine plots "
                "cos(Q, K)")
    _suptitle(fig,
        f"{what}, step {run.step}, training image #{image}, caption {caption}: \u201c{text}\u201d"
        f"{more}\neach patch shows the predictor token at it on the image's training mask: "
        "target patches (white outline) the mask tokens (mean over the blocks covering them), "
        f"context patches the context tokens (mean over the {k} target-block sequences); grey: "
        f"not in the predictor's input{note}", 8.5)
    return fig


# ---- Curves -----------------------------------------------------------------------------------

GROUPS = (
    ("loss", (r"loss", r"loss_pred"), "log"),
    ("penalties (unweighted)", (r"loss_sparse", r"loss_consistency"), "linear"),
    ("mean O per conditioned layer", (r"o_mean/layer\d+",), "linear"),
    ("fraction of O > 0", (r"o_frac_pos/layer\d+",), "linear"),
    ("feature std (target, prediction)", (r"monitor/target_std", r"monitor/pred_std"), "linear"),
    ("target features' effective rank", (r"monitor/target_rank",), "linear"),
    ("cosine(prediction, target)", (r"monitor/pred_target_cos",), "linear"),
)


def _line(ax, steps, values, label, **kw):
    ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None,
            markersize=3, linewidth=1.2, **kw)


def curves_figure(scalars: dict, workdir: str) -> Figure:
    """One panel per group of GROUPS present, then one per evaluator: its tasks over the
    steps, the encoder at initialisation (eval_init/...) as dashed lines of the same colour."""
    panels = []
    for title, patterns, scale in GROUPS:
        tags = [t for p in patterns for t in sorted(scalars) if re.fullmatch(p, t)]
        if tags:
            panels.append((title, tags, scale))
    evaluators = sorted({t.split("/")[1] for t in scalars
                         if re.fullmatch(r"eval(_init)?/[^/]+/.+", t)})
    for name in evaluators:
        panels.append((f"eval/{name}", sorted(t for t in scalars
                                              if t.startswith(f"eval/{name}/")), "eval"))
    if not panels:
        raise UserError(f"no scalars to plot in the TensorBoard logs of {workdir}.")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.1 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, tags, scale) in zip(axes.flat, panels):
        if scale == "eval":
            name = title.split("/", 1)[1]
            for i, tag in enumerate(tags):
                color = f"C{i % 10}"
                _line(ax, *scalars[tag], tag.split("/", 2)[2], color=color)
                init = scalars.get(tag.replace("eval/", "eval_init/", 1))
                if init is not None:
                    ax.axhline(init[1][-1], color=color, linestyle="--", linewidth=1.0)
            orphans = sorted(t for t in scalars if t.startswith(f"eval_init/{name}/")
                             and t.replace("eval_init/", "eval/", 1) not in scalars)
            for i, tag in enumerate(orphans, len(tags)):
                ax.axhline(scalars[tag][1][-1], color=f"C{i % 10}", linestyle="--",
                           linewidth=1.0, label=f"{tag.split('/', 2)[2]} (init only)")
            title += "  (dashed: encoder at init)"
        else:
            for tag in tags:
                _line(ax, *scalars[tag], tag)
            if scale == "log" and all((scalars[t][1] > 0).all() for t in tags):
                ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Training curves of {workdir} (TensorBoard logs and evals/step_N.json)",
                 fontsize=10)
    return fig
