"""Accelerator chips: peak dense bf16 FLOP/s and HBM per chip, and how JAX names them.

Used to turn XLA's FLOP counts into MFU (the trainer's logs) and to judge whether a compiled
step fits a chip's memory (tools/aot.py). Dependency-free on purpose: importing it must not
import jax or start a backend.

Sources (vendor data sheets and product pages, checked 2026-11):
  TPU v4, v5e, v5p, v6e: Google Cloud TPU documentation, "System architecture" pages of each
      version ("Peak compute per chip (bf16)", "HBM capacity"; Google gives GiB).
  H100: NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOP/s *with sparsity* for SXM,
      i.e. 989 dense; PCIe 1,513 -> 756 dense; NVL 1,671 -> 835 dense. 80 GB (NVL 94 GB).
  H200: NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 (SXM) / 1,671 (NVL) with sparsity,
      989 / 835 dense; 141 GB HBM3e.
  A100: NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOP/s dense (624 with sparsity);
      40 GB or 80 GB.
NVIDIA quotes decimal GB; we take them as 1e9 bytes, slightly below what the driver reports, so
a fit judged against them errs on the safe side. All peaks are dense (no 2:4 sparsity): the
numbers MFU is conventionally quoted against.
"""

import dataclasses
import math
from typing import Optional

GiB = 2 ** 30
GB = 10 ** 9
TFLOPS = 1e12


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str                   # our short name: the topology prefix for TPUs ("v5p")
    peak_bf16_flops: float      # dense bf16 FLOP/s per chip
    hbm_bytes: int              # HBM per chip
    device_kinds: tuple         # jax Device.device_kind strings, compared case-insensitively
    aliases: tuple = ()         # other names accepted in topology names ("v5litepod")


# ---- The table -------------------------------------------------------------------------------

CHIPS = (
    Chip("v4", 275 * TFLOPS, 32 * GiB, ("TPU v4",)),
    Chip("v5e", 197 * TFLOPS, 16 * GiB, ("TPU v5 lite", "TPU v5e"), aliases=("v5litepod", "v5lite")),
    # JAX reports a v5p chip as "TPU v5" (jax._src.test_util.is_device_tpu special-cases it).
    Chip("v5p", 459 * TFLOPS, 95 * GiB, ("TPU v5", "TPU v5p")),
    Chip("v6e", 918 * TFLOPS, 32 * GiB, ("TPU v6 lite", "TPU v6e"), aliases=("trillium", "v6")),
    Chip("H100", 989 * TFLOPS, 80 * GB, ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", "NVIDIA H100")),
    Chip("H100-PCIe", 756 * TFLOPS, 80 * GB, ("NVIDIA H100 PCIe",)),
    Chip("H100-NVL", 835 * TFLOPS, 94 * GB, ("NVIDIA H100 NVL",)),
    Chip("H200", 989 * TFLOPS, 141 * GB, ("NVIDIA H200",)),
    Chip("H200-NVL", 835 * TFLOPS, 141 * GB, ("NVIDIA H200 NVL",)),
    Chip("A100", 312 * TFLOPS, 80 * GB, ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe",
                                        "NVIDIA A100")),
    Chip("A100-40GB", 312 * TFLOPS, 40 * GB, ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB")),
)


# ---- Look-ups --------------------------------------------------------------------------------

def chip_for_device_kind(kind: str) -> Optional[Chip]:
    """The chip a jax Device.device_kind names, or None if it is not in the table.

    TPU kinds must match exactly (case-insensitively): "TPU v5" is a v5p, "TPU v5 lite" a v5e,
    and a kind we do not know must not borrow a neighbour's numbers. An unknown NVIDIA kind
    takes the longest known name it starts with ("NVIDIA H100 80GB HBM3 xyz" is an H100).
    """
    kind = " ".join((kind or "").lower().split())
    if not kind:
        return None
    best, best_len = None, -1
    for chip in CHIPS:
        for known in chip.device_kinds:
            known = known.lower()
            if kind == known:
                return chip
            if (known.startswith("nvidia") and kind.startswith(known + " ")
                    and len(known) > best_len):
                best, best_len = chip, len(known)
    return best


def _tpu_chip(generation: str) -> Optional[Chip]:
    generation = generation.strip().lower()
    for chip in CHIPS:
        if chip.name.startswith("v") and generation in (chip.name,) + chip.aliases:
            return chip
    return None


def chip_for_topology(name: str) -> Chip:
    """The chip of a TPU topology name such as "v5p:4x4x4", "v6e:8x8" or "v5e:4x4".

    Raises ValueError (naming the known generations) for anything else.
    """
    generation, dims = parse_topology(name)
    del dims
    chip = _tpu_chip(generation)
    if chip is None:
        known = ", ".join(c.name for c in CHIPS if c.name.startswith("v"))
        raise ValueError(f"unknown TPU generation {generation!r} in topology {name!r}; "
                         f"use one of {known} (e.g. v5p:4x4x4, v6e:8x8).")
    return chip


def parse_topology(name: str) -> tuple:
    """"v5p:4x4x4" -> ("v5p", (4, 4, 4)); ValueError if it is not GENERATION:AxB[xC]."""
    generation, sep, dims = (name or "").partition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    if not sep or not generation or len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"topology {name!r} is not of the form GENERATION:AxB or "
                         "GENERATION:AxBxC, e.g. v5e:2x2, v6e:8x8, v4:2x2x2, v5p:4x4x4.")
    return generation, shape


def topology_num_chips(name: str) -> int:
    return math.prod(parse_topology(name)[1])


# ---- Peak FLOP/s -----------------------------------------------------------------------------

def peak_flops(config, device, devices_per_chip: int = 1) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one jax device, or None when unknown (e.g. a CPU).

    `config.peak_flops_per_device` > 0 overrides the table (a chip we do not list, a different
    dtype, or a measured roofline). `devices_per_chip` splits a chip's peak over the devices
    JAX makes of it (2 for a TPU v4 seen core by core, as compile-only v4 topologies are;
    1 for megacore v4, every other TPU and every GPU).
    """
    override = float(config.get("peak_flops_per_device", 0) or 0) if config is not None else 0.0
    if override > 0:
        return override
    chip = chip_for_device_kind(getattr(device, "device_kind", ""))
    return None if chip is None else chip.peak_bf16_flops / max(devices_per_chip, 1)
