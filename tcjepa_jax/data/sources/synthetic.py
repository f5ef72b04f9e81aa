"""`input.source = "synthetic"`: the captioned synthetic scenes (data/synthetic.py), no files."""

from tcjepa_jax.data.synthetic import SyntheticScenes


def make(input_cfg, split: str) -> SyntheticScenes:
    return SyntheticScenes(
        image_size=input_cfg.image_size,
        seed=input_cfg.get("seed", 0),
        split=split,
        size=input_cfg.get("synthetic_size", 1_000_000),
        min_objects=input_cfg.get("min_objects", 1),
        max_objects=input_cfg.get("max_objects", 4),
        object_scale=input_cfg.get("object_scale", 1.0),
        background=input_cfg.get("background", "textured"),
    )
