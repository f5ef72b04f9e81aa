"""Statistics and contracts of the multi-block mask sampler (docs/method.md)."""

import dataclasses

import numpy as np
import pytest

from tcjepa_jax import masks
from tcjepa_jax.masks import MaskSpec, block_shape, sample_block, sample_masks

GRIDS = [(14, 14), (8, 12)]
NUM_SAMPLES = 2000


def _valid(idx, valid):
    return idx[valid]


@pytest.fixture(scope="module", params=GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def drawn(request):
    """Many samples for one grid, shared by the statistical tests."""
    spec = MaskSpec(grid=request.param)
    samples = [sample_masks(spec, seed=0, index=i, epoch=0) for i in range(NUM_SAMPLES)]
    return spec, samples


def _target_coverage(spec, samples):
    """How many samples cover each cell with at least one target block."""
    counts = np.zeros(spec.grid[0] * spec.grid[1], dtype=np.int64)
    for m in samples:
        counts[np.unique(m["target_idx"][m["target_valid"]])] += 1
    return counts.reshape(spec.grid)


def test_every_cell_is_covered_including_last_row_and_column(drawn):
    spec, samples = drawn
    coverage = _target_coverage(spec, samples)
    assert coverage.min() > 0, coverage
    # Edge cells are rarer than central ones but not vanishingly so.
    assert coverage[-1, :].min() > 0.02 * NUM_SAMPLES
    assert coverage[:, -1].min() > 0.02 * NUM_SAMPLES


def test_coverage_is_mirror_symmetric(drawn):
    spec, samples = drawn
    coverage = _target_coverage(spec, samples)
    p = coverage / NUM_SAMPLES
    for flipped in (coverage[::-1, :], coverage[:, ::-1]):
        # Difference of two binomial counts; 5 standard deviations per cell.
        q = flipped / NUM_SAMPLES
        std = np.sqrt(NUM_SAMPLES * (p * (1 - p) + q * (1 - q)))
        tol = 5 * np.maximum(std, 1.0)
        assert np.all(np.abs(coverage - flipped) <= tol), (coverage - flipped)


def test_context_never_overlaps_targets_and_keeps_enough(drawn):
    spec, samples = drawn
    num_patches = spec.grid[0] * spec.grid[1]
    for m in samples:
        ctx = _valid(m["context_idx"], m["context_valid"])
        tgt = m["target_idx"][m["target_valid"]]
        assert ctx.size >= spec.min_keep
        assert not np.intersect1d(ctx, tgt).size
        assert np.unique(ctx).size == ctx.size
        assert ctx.min() >= 0 and ctx.max() < num_patches
        for i in range(spec.num_targets):
            t = _valid(m["target_idx"][i], m["target_valid"][i])
            assert t.size >= 1 and np.unique(t).size == t.size
            assert t.min() >= 0 and t.max() < num_patches


def test_layout_shapes_dtypes_padding(drawn):
    spec, samples = drawn
    shapes = {
        "context_idx": ((spec.num_context_slots,), np.int32),
        "context_valid": ((spec.num_context_slots,), np.bool_),
        "target_idx": ((spec.num_targets, spec.num_target_slots), np.int32),
        "target_valid": ((spec.num_targets, spec.num_target_slots), np.bool_),
    }
    for m in samples:
        assert set(m) == set(shapes)
        for key, (shape, dtype) in shapes.items():
            assert m[key].shape == shape and m[key].dtype == dtype, key
        rows = [(m["context_idx"], m["context_valid"])]
        rows += list(zip(m["target_idx"], m["target_valid"]))
        for idx, valid in rows:
            n = int(valid.sum())
            # Valid slots first, ascending; padding holds 0.
            assert valid[:n].all() and not valid[n:].any()
            assert np.all(np.diff(idx[:n]) > 0)
            assert np.all(idx[n:] == 0)


def test_targets_are_rectangles_with_sizes_in_range(drawn):
    spec, samples = drawn
    height, width = spec.grid
    for m in samples[:300]:
        for idx, valid in zip(m["target_idx"], m["target_valid"]):
            rows, cols = np.divmod(idx[valid], width)
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert h * w == valid.sum()  # a full rectangle
            assert h <= height and w <= width


def test_slot_counts_are_the_exact_max_over_a_dense_grid():
    """The slots are never exceeded, and are reached (no wasted padding)."""
    for grid in [(14, 14), (8, 12), (16, 16), (5, 9), (24, 24)]:
        for spec in [
            MaskSpec(grid=grid),
            MaskSpec(grid=grid, target_scale=(0.05, 0.33), target_aspect=(0.5, 2.0), min_keep=4),
        ]:
            s_lo, s_hi = spec.target_scale
            a_lo, a_hi = spec.target_aspect
            areas = [
                np.prod(block_shape(s, a, grid))
                for s in np.linspace(s_lo, s_hi, 41)
                for a in np.linspace(a_lo, a_hi, 401)
            ]
            assert max(areas) == spec.num_target_slots, (spec, max(areas))
            c_lo, c_hi = spec.context_scale
            largest_context = max(np.prod(block_shape(s, 1.0, grid)) for s in np.linspace(c_lo, c_hi, 101))
            expected = min(largest_context, grid[0] * grid[1] - min(areas))
            assert spec.num_context_slots == expected, (spec, expected)


def test_slot_counts_are_static():
    spec = MaskSpec(grid=(14, 14))
    assert (spec.num_target_slots, spec.num_context_slots) == (42, 171)
    assert MaskSpec(grid=(14, 14)).num_target_slots == spec.num_target_slots


def test_scale_and_aspect_are_drawn_independently():
    rng = np.random.default_rng(123)
    draws = np.array([sample_block(rng, (0.15, 0.2), (0.75, 1.5), (14, 14)) for _ in range(5000)])
    top, left, h, w, scale, aspect = draws.T
    assert abs(np.corrcoef(scale, aspect)[0, 1]) < 0.05
    assert scale.min() >= 0.15 and scale.max() <= 0.2
    assert aspect.min() >= 0.75 and aspect.max() <= 1.5
    # Both ranges are actually used, not collapsed to a point.
    assert np.ptp(scale) > 0.045 and np.ptp(aspect) > 0.7
    # The corner can reach the last row and column.
    assert np.any(top + h == 14) and np.any(left + w == 14)
    assert np.all(top + h <= 14) and np.all(left + w <= 14)
    assert all(
        (hh, ww) == block_shape(s, a, (14, 14)) for hh, ww, s, a in zip(h.astype(int), w.astype(int), scale, aspect)
    )


def test_pure_function_of_seed_index_epoch():
    spec = MaskSpec(grid=(14, 14))

    def same(a, b):
        return all(np.array_equal(a[k], b[k]) for k in a)

    ref = sample_masks(spec, seed=7, index=3, epoch=2)
    assert same(ref, sample_masks(spec, seed=7, index=3, epoch=2))
    assert same(ref, sample_masks(MaskSpec(grid=[14, 14]), seed=7, index=3, epoch=2))
    assert not same(ref, sample_masks(spec, seed=7, index=3, epoch=3))
    assert not same(ref, sample_masks(spec, seed=7, index=4, epoch=2))
    assert not same(ref, sample_masks(spec, seed=8, index=3, epoch=2))
    # (index, epoch) must not be interchangeable.
    assert not same(sample_masks(spec, 7, 2, 3), sample_masks(spec, 7, 3, 2))
    with pytest.raises(ValueError, match="non-negative"):
        sample_masks(spec, seed=-1, index=0, epoch=0)


def test_fallback_keeps_contract_when_targets_cover_the_grid():
    # Huge targets: 4 blocks of up to ~60% of a 6x6 grid usually leave < 10 context patches.
    spec = MaskSpec(grid=(6, 6), target_scale=(0.5, 0.6), target_aspect=(1.0, 1.0), min_keep=10)
    used_fallback = 0
    for i in range(200):
        m = sample_masks(spec, seed=1, index=i, epoch=0)
        ctx = _valid(m["context_idx"], m["context_valid"])
        tgt = m["target_idx"][m["target_valid"]]
        assert ctx.size >= spec.min_keep
        assert not np.intersect1d(ctx, tgt).size
        assert m["context_idx"].shape == (spec.num_context_slots,)
        assert m["target_idx"].shape == (4, spec.num_target_slots)
        used_fallback += all(np.array_equal(m["target_idx"][0], t) for t in m["target_idx"][1:])
    assert used_fallback > 0


def test_from_config_accepts_lists_and_partial_configs():
    cfg = {"num_targets": 3, "target_scale": [0.1, 0.2], "min_keep": None, "unrelated": 1}
    spec = MaskSpec.from_config(cfg, grid=[14, 14])
    assert spec == MaskSpec(grid=(14, 14), num_targets=3, target_scale=(0.1, 0.2))
    assert isinstance(spec.target_scale, tuple) and spec.grid == (14, 14)
    assert MaskSpec.from_config({}, (8, 12)) == MaskSpec(grid=(8, 12))
    hash(spec)


def test_from_config_accepts_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"target_aspect": [0.5, 2.0], "min_keep": 4})
    spec = MaskSpec.from_config(cfg, (14, 14))
    assert spec.target_aspect == (0.5, 2.0) and spec.min_keep == 4


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"target_scale": (0.0, 0.2)}, "target_scale must lie in"),
        ({"context_scale": (0.9, 1.2)}, "context_scale must lie in"),
        ({"target_scale": (0.3, 0.2)}, "low <= high"),
        ({"target_aspect": (0.0, 1.5)}, "target_aspect must be > 0"),
        ({"context_aspect": (1.0, float("nan"))}, "finite range"),
        ({"target_scale": (0.1,)}, "pair of numbers"),
        ({"min_keep": 197}, "min_keep must be in"),
        ({"min_keep": 0}, "min_keep must be in"),
        ({"num_targets": 0}, "num_targets must be >= 1"),
        ({"grid": (0, 14)}, "grid must be two positive ints"),
        ({"grid": (14.5, 14)}, "grid must be two ints"),
        ({"target_scale": (0.9, 0.97)}, "fewer than min_keep"),
        ({"context_scale": (0.02, 0.04)}, "fewer than min_keep"),
    ],
)
def test_bad_specs_raise_clear_value_errors(changes, message):
    kwargs = {"grid": (14, 14), **changes}
    with pytest.raises(ValueError, match=message) as info:
        MaskSpec(**kwargs)
    assert str(info.value).startswith("invalid MaskSpec")


def test_spec_is_frozen():
    spec = MaskSpec(grid=(14, 14))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_targets = 2


def test_max_tries_is_bounded():
    assert 1 <= masks.MAX_TRIES <= 100


def test_max_context_caps_slots_and_keeps_small_contexts():
    exact, capped = MaskSpec(grid=(8, 8)), MaskSpec(grid=(8, 8), max_context=30)
    assert capped.num_context_slots == 30 < exact.num_context_slots
    saw_cap = False
    for i in range(300):
        a, b = sample_masks(exact, 0, i, 0), sample_masks(capped, 0, i, 0)
        np.testing.assert_array_equal(a["target_idx"], b["target_idx"])
        full = set(a["context_idx"][a["context_valid"]].tolist())
        kept = set(b["context_idx"][b["context_valid"]].tolist())
        if len(full) <= 30:
            assert kept == full  # below the cap nothing changes
        else:
            saw_cap = True
            assert len(kept) == 30 and kept < full  # a subset of exactly the cap's size
    assert saw_cap
