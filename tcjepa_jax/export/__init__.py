"""Trained weights out to PyTorch and back (command: python -m tcjepa_jax.export).

- timm_format: our ViT encoder <-> timm VisionTransformer state dict (`to_timm`, `from_timm`,
  `timm_kwargs`).
- full_format: every module in one safetensors file with stable key names, and `load_full`.
- restore: partial, read-only restore of a run's checkpoint (only the parameters needed).
- cli: the command-line tool (`run` is the tcjepa-export console script).

Writing needs `safetensors` only (numpy); loading into PyTorch needs torch and timm
(`pip install -e ".[export]"`). Importing this package defines no command-line flags.
"""

from tcjepa_jax.export.full_format import load_full, save_full
from tcjepa_jax.export.timm_format import from_timm, timm_kwargs, to_timm

__all__ = ["load_full", "save_full", "from_timm", "timm_kwargs", "to_timm"]
