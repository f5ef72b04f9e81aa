"""I-JEPA multi-block mask sampler with static shapes (docs/method.md).

Per example we draw `num_targets` rectangular target blocks and one context block,
then remove every target patch from the context so the context encoder never
sees what the predictor must predict.

Differences from the I-JEPA reference sampler, on purpose:
  * scale and aspect ratio come from two independent uniform draws (the reference
    drives both from one random number, so they are perfectly correlated);
  * aspect ratio is drawn uniformly in linear space (as in I-JEPA), not log space;
  * the top-left corner is uniform over [0, H-h] x [0, W-w] *inclusive*, so the last
    row and column are covered as often as the first;
  * every output has a fixed number of slots computed from the spec alone, plus a
    validity mask, so a jitted train step never sees a new shape;
  * optional slot caps (`max_context`, `max_target`) bound the tokens the encoder and the
    predictor process; a context or target block longer than its cap keeps a uniformly
    random subset of its patches (the reference cuts every mask of a batch to the batch's
    shortest by keeping its first indices, i.e. the top rows).

Everything is plain numpy and a pure function of (seed, index, epoch), so masks
can be regenerated exactly after a restart and on any host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, Mapping

import numpy as np

# Resampling attempts before the deterministic fallback. With the I-JEPA defaults
# the first attempt almost always leaves >= min_keep context patches; the cap only
# bounds the time spent on extreme specs.
MAX_TRIES = 20

# Mixed into the seed so the mask stream differs from any other stream (e.g. data
# augmentation) that is also derived from (seed, epoch, index).
_MASK_STREAM = 0x6D61736B  # "mask"

# Relative margin around computed rounding breakpoints; float error in computing a
# breakpoint is ~1e-15 relative, so the true jump lies well inside this margin.
_BREAK_MARGIN = 1e-9


def _as_range(value: Any, name: str) -> tuple[float, float]:
    # Configs may give lists (YAML/ConfigDict); tuples keep the spec hashable.
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid MaskSpec: {name} must be a pair of numbers, got {value!r}") from None
    return lo, hi


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    grid: tuple[int, int]  # patch grid (H, W)
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)  # fraction of the grid's patches
    target_aspect: tuple[float, float] = (0.75, 1.5)  # h / w
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10  # at least this many context patches
    # Cap on context slots (0 = none, the exact bound). The exact bound is loose (171 slots for
    # about 89 valid patches on average at the I-JEPA defaults on a 14x14 grid) and every slot
    # costs compute in the encoder and the predictor; a context above the cap keeps a uniformly
    # random subset of max_context patches (I-JEPA instead cuts every context in a batch to the
    # batch's shortest, keeping the top rows). Must be 0 or >= min_keep, so min_keep still holds.
    max_context: int = 0
    # Cap on slots per target block (0 = none, the exact bound). A block with more patches keeps
    # a uniformly random subset of max_target of them as prediction targets; the context still
    # excludes the whole block. Blocks at or below the cap are unchanged.
    max_target: int = 0

    def __post_init__(self):
        try:
            grid = tuple(operator.index(g) for g in self.grid)
            num_targets = operator.index(self.num_targets)
            min_keep = operator.index(self.min_keep)
            max_context = operator.index(self.max_context)
            max_target = operator.index(self.max_target)
        except TypeError:
            raise ValueError(
                f"invalid MaskSpec: grid must be two ints and num_targets/min_keep/max_context/"
                f"max_target ints, got grid={self.grid!r}, num_targets={self.num_targets!r}, "
                f"min_keep={self.min_keep!r}, max_context={self.max_context!r}, max_target={self.max_target!r}"
            ) from None
        # Normalise in place so equal specs compare and hash equal however they were written.
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "num_targets", num_targets)
        object.__setattr__(self, "min_keep", min_keep)
        object.__setattr__(self, "max_context", max_context)
        object.__setattr__(self, "max_target", max_target)
        for name in ("target_scale", "target_aspect", "context_scale", "context_aspect"):
            object.__setattr__(self, name, _as_range(getattr(self, name), name))

        problems = []
        if len(grid) != 2 or min(grid) < 1:
            problems.append(f"grid must be two positive ints, got {grid}")
        if num_targets < 1:
            problems.append(f"num_targets must be >= 1, got {num_targets}")
        if max_context < 0:
            problems.append(f"max_context must be 0 (no cap) or >= min_keep, got {max_context}")
        if max_target < 0:
            problems.append(f"max_target must be 0 (no cap) or >= 1, got {max_target}")
        for name in ("target_scale", "context_scale", "target_aspect", "context_aspect"):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                problems.append(f"{name} must be a finite range with low <= high, got {(lo, hi)}")
            elif name.endswith("scale") and not (0.0 < lo and hi <= 1.0):
                problems.append(f"{name} must lie in (0, 1], got {(lo, hi)}")
            elif name.endswith("aspect") and lo <= 0.0:
                problems.append(f"{name} must be > 0, got {(lo, hi)}")
        if problems:
            raise ValueError("invalid MaskSpec: " + "; ".join(problems))

        # Feasibility, checked only once the ranges are sane. The fallback relies on
        # both: it keeps one target block and takes context from the rest of the grid.
        num_patches = grid[0] * grid[1]
        if not 1 <= min_keep <= num_patches:
            problems.append(f"min_keep must be in [1, {num_patches}] (patches in grid {grid}), got {min_keep}")
        else:
            largest_target = _area_bound(self.target_scale[1], self.target_aspect, grid, largest=True)
            if num_patches - largest_target < min_keep:
                problems.append(
                    f"a target block can cover {largest_target} of {num_patches} patches, "
                    f"leaving fewer than min_keep={min_keep} for the context"
                )
            if 0 < self.max_context < min_keep:
                problems.append(f"max_context={self.max_context} must be 0 (no cap) or >= min_keep={min_keep}")
            elif self.num_context_slots < min_keep:
                problems.append(
                    f"context blocks hold at most {self.num_context_slots} patches after removing a target, "
                    f"fewer than min_keep={min_keep}"
                )
        if problems:
            raise ValueError("invalid MaskSpec: " + "; ".join(problems))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, grid) -> "MaskSpec":
        """Build from a ConfigDict or mapping; missing or None fields keep their defaults."""
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name == "grid" or cfg is None:
                continue
            value = cfg.get(field.name, None)
            if value is not None:
                kwargs[field.name] = value
        return cls(grid=tuple(grid), **kwargs)

    @functools.cached_property
    def num_target_slots(self) -> int:
        # Block area is non-decreasing in scale, so the largest block has the largest scale.
        bound = _area_bound(self.target_scale[1], self.target_aspect, self.grid, largest=True)
        return min(bound, self.max_target) if self.max_target > 0 else bound

    @functools.cached_property
    def num_context_slots(self) -> int:
        # The context is (context block) minus (all targets), a subset of both the
        # context block and (grid minus the first target block). The second bound holds
        # even when that target lies partly or wholly outside the context block.
        largest_context = _area_bound(self.context_scale[1], self.context_aspect, self.grid, largest=True)
        smallest_target = _area_bound(self.target_scale[0], self.target_aspect, self.grid, largest=False)
        bound = min(largest_context, self.grid[0] * self.grid[1] - smallest_target)
        return min(bound, self.max_context) if self.max_context > 0 else bound


def block_shape(scale: float, aspect: float, grid: tuple[int, int]) -> tuple[int, int]:
    """Block (h, w) for a scale (fraction of patches) and aspect (h / w).

    Rounds half up rather than numpy's half-to-even so the breakpoints used by
    `_area_bound` are exactly where the size changes. Every operation here is
    monotone in `scale` and `aspect`, which the slot bounds rely on.
    """
    height, width = grid
    area = scale * height * width
    h = min(max(math.floor(math.sqrt(area * aspect) + 0.5), 1), height)
    w = min(max(math.floor(math.sqrt(area / aspect) + 0.5), 1), width)
    return h, w


def _area_bound(scale: float, aspect_range: tuple[float, float], grid: tuple[int, int], largest: bool) -> int:
    """Max (or min) of h*w over all aspects in `aspect_range` at a fixed scale.

    h only rises and w only falls as the aspect grows, and each changes only where
    sqrt(area*a) or sqrt(area/a) crosses k + 1/2. Cut the range at those breakpoints
    (widened by a tiny margin) into pieces; on a piece [p, q], every shape has
    h(p) <= h <= h(q) and w(q) <= w <= w(p), so h(q)*w(p) bounds the area from
    above and h(p)*w(q) from below. This is a true bound, and exact because each
    piece contains at most one size change (unless two breakpoints fall within the
    margin of each other, where it may be off by one row or column in the safe
    direction).
    """
    lo, hi = aspect_range
    height, width = grid
    area = scale * height * width
    breaks = [(k + 0.5) ** 2 / area for k in range(height + 1)]
    breaks += [area / (k + 0.5) ** 2 for k in range(width + 1)]
    points = {lo, hi}
    for b in breaks:
        for p in (b * (1 - _BREAK_MARGIN), b, b * (1 + _BREAK_MARGIN)):
            if lo < p < hi:
                points.add(p)
    points = sorted(points)
    shapes = [block_shape(scale, a, grid) for a in points]
    if len(shapes) == 1:  # degenerate range lo == hi
        return shapes[0][0] * shapes[0][1]
    if largest:
        return max(shapes[i + 1][0] * shapes[i][1] for i in range(len(shapes) - 1))
    return min(shapes[i][0] * shapes[i + 1][1] for i in range(len(shapes) - 1))


def _block_from_uniforms(u: np.ndarray, scale_range, aspect_range, grid):
    """Turn four U[0,1) numbers into (top, left, h, w, scale, aspect).

    Scale and aspect use separate numbers, so they are independent.
    """
    height, width = grid
    # Clip: lo + (hi - lo) * u can round one ulp past hi, and the slot bounds assume it cannot.
    (s_lo, s_hi), (a_lo, a_hi) = scale_range, aspect_range
    scale = min(max(s_lo + (s_hi - s_lo) * float(u[0]), s_lo), s_hi)
    aspect = min(max(a_lo + (a_hi - a_lo) * float(u[1]), a_lo), a_hi)
    h, w = block_shape(scale, aspect, grid)
    # H - h + 1 choices so the block can touch the bottom / right edge; min() guards u -> 1.
    top = min(int(u[2] * (height - h + 1)), height - h)
    left = min(int(u[3] * (width - w + 1)), width - w)
    return top, left, h, w, scale, aspect


def sample_block(rng: np.random.Generator, scale_range, aspect_range, grid):
    """Draw one block: returns (top, left, h, w, scale, aspect)."""
    return _block_from_uniforms(rng.random(4), scale_range, aspect_range, grid)


def _rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    for name, v in (("seed", seed), ("index", index), ("epoch", epoch)):
        if operator.index(v) < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v}")
    seq = np.random.SeedSequence([int(seed), int(epoch), int(index), _MASK_STREAM])
    return np.random.Generator(np.random.Philox(seq))


def _subsample(rng: np.random.Generator, ids: np.ndarray, size: int) -> np.ndarray:
    """`ids` if it fits in `size` slots, else a uniformly random subset of `size` of them, sorted.

    Uniform over the patches (every subset equally likely), so a capped mask covers every
    row and column of the uncapped one in proportion; no rng draw when nothing is cut.
    """
    if ids.size <= size:
        return ids
    return np.sort(rng.choice(ids, size, replace=False))


def sample_masks(spec: MaskSpec, seed: int, index: int, epoch: int) -> dict[str, np.ndarray]:
    """Context and target patch indices for one example; a pure function of (seed, index, epoch).

    Returns context_idx / context_valid of shape (num_context_slots,) and
    target_idx / target_valid of shape (num_targets, num_target_slots). Indices are
    row-major (r * W + c), ascending among the valid slots, which come first;
    padded slots hold 0 and are marked invalid.

    A context with more patches than num_context_slots (possible only with
    max_context, or in the fallback below) keeps a uniformly random subset of
    num_context_slots of them; a target block with more than num_target_slots
    patches (only with max_target) keeps a uniformly random subset of that size,
    while the context still excludes the whole block. Shorter ones are kept whole and
    padded: a cap is a slot count, and dropping patches below it would save nothing.
    The subsets come from the same (seed, index, epoch) stream, drawn after the blocks,
    so a cap never changes the blocks themselves, and the target cap never changes
    the context.

    If MAX_TRIES attempts all leave fewer than min_keep context patches, the last
    attempt's first target block is used for every target and the context is the
    rest of the grid, subsampled as above when it exceeds the slots. The spec
    validation guarantees that this still has >= min_keep patches, never overlaps a
    target, and fits the slots.
    """
    height, width = spec.grid
    rng = _rng(seed, index, epoch)
    num_blocks = spec.num_targets + 1
    for _ in range(MAX_TRIES):
        u = rng.random((num_blocks, 4))
        target_masks = []
        covered = np.zeros(spec.grid, dtype=bool)
        for i in range(spec.num_targets):
            top, left, h, w, _, _ = _block_from_uniforms(u[i], spec.target_scale, spec.target_aspect, spec.grid)
            m = np.zeros(spec.grid, dtype=bool)
            m[top : top + h, left : left + w] = True
            target_masks.append(m)
            covered |= m
        top, left, h, w, _, _ = _block_from_uniforms(u[-1], spec.context_scale, spec.context_aspect, spec.grid)
        context = np.zeros(spec.grid, dtype=bool)
        context[top : top + h, left : left + w] = True
        context &= ~covered
        context_ids = np.flatnonzero(context)
        if context_ids.size >= spec.min_keep:
            break
    else:
        target_masks = [target_masks[0]] * spec.num_targets
        context_ids = np.flatnonzero(~target_masks[0])
    context_ids = _subsample(rng, context_ids, spec.num_context_slots)
    target_ids = [_subsample(rng, np.flatnonzero(m), spec.num_target_slots) for m in target_masks]
    # The slot counts are only worth having if they are never exceeded.
    assert context_ids.size <= spec.num_context_slots, (context_ids.size, spec)
    assert max(t.size for t in target_ids) <= spec.num_target_slots, (target_ids, spec)

    context_idx = np.zeros(spec.num_context_slots, dtype=np.int32)
    context_valid = np.zeros(spec.num_context_slots, dtype=bool)
    context_idx[: context_ids.size] = context_ids
    context_valid[: context_ids.size] = True
    target_idx = np.zeros((spec.num_targets, spec.num_target_slots), dtype=np.int32)
    target_valid = np.zeros((spec.num_targets, spec.num_target_slots), dtype=bool)
    for i, ids in enumerate(target_ids):
        target_idx[i, : ids.size] = ids
        target_valid[i, : ids.size] = True
    return {
        "context_idx": context_idx,
        "context_valid": context_valid,
        "target_idx": target_idx,
        "target_valid": target_valid,
    }
