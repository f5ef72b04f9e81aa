"""Our ViT encoder <-> a timm `VisionTransformer` state dict.

The encoder (tcjepa_jax/models/vit.py) is a standard pre-LN ViT without a [cls] token, so it is
exactly timm's `VisionTransformer(class_token=False, global_pool="avg", fc_norm=False,
num_classes=0, ...)` (`timm_kwargs`):

  ours (Flax, unrolled)                           timm
  patch_embed/kernel (p*p*3, D)                   patch_embed.proj.weight (D, 3, p, p): OIHW
  patch_embed/bias                                patch_embed.proj.bias
  fixed 2-D sin-cos (models.vit.sincos_2d)        pos_embed (1, N, D): stored
  block_i/norm{1,2}/{scale,bias}                  blocks.i.norm{1,2}.{weight,bias}
  block_i/attn/{query,key,value}/kernel (D,H,d)   blocks.i.attn.qkv.weight (3D, D): each
                                                  (D, H*d).T, stacked q; k; v
  block_i/attn/{query,key,value}/bias (H, d)      blocks.i.attn.qkv.bias (3D)
  block_i/attn/out/kernel (H, d, D), bias         blocks.i.attn.proj.weight (D, D): (H*d, D).T
  block_i/mlp/fc{1,2}/{kernel,bias}               blocks.i.mlp.fc{1,2}.{weight,bias}: kernel.T
  norm/{scale,bias}                               norm.{weight,bias}

Both LayerNorms use eps 1e-6 (timm's default), both GELUs are exact (erf). Our encoder returns
the final-normed tokens: timm's `forward_features` (B, N, D), and with `fc_norm=False` the final
norm stays on the tokens, so `forward` / `forward_head(pre_logits=True)` is their mean, the
average-pooled features our probes read. Images: NCHW for timm (NHWC for us), normalised with
the ImageNet mean and std, at `img_size` (the position embedding is stored for that grid).
"""

import numpy as np

from tcjepa_jax.export import layout
from tcjepa_jax.models.vit import sincos_2d, vit_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # as tcjepa_jax/data/transforms.py
IMAGENET_STD = (0.229, 0.224, 0.225)


def timm_kwargs(config) -> dict:
    """Keyword arguments of timm.models.vision_transformer.VisionTransformer that build the
    encoder of `config` (a run config: model.encoder, input.image_size). JSON-serialisable."""
    enc = vit_config(config["model"]["encoder"])
    size = int(config["input"]["image_size"])
    if size <= 0 or size % enc["patch_size"]:
        raise ValueError(f"image size {size} is not a positive multiple of the patch size "
                         f"{enc['patch_size']} of {config['model']['encoder']!r}.")
    return dict(
        img_size=size,
        patch_size=enc["patch_size"],
        in_chans=3,
        embed_dim=enc["width"],
        depth=enc["depth"],
        num_heads=enc["num_heads"],
        mlp_ratio=enc["mlp_ratio"],
        qkv_bias=True,
        class_token=False,
        global_pool="avg",
        fc_norm=False,       # keep the final LayerNorm on the tokens, as ours (pool after it)
        num_classes=0,
    )


def preprocessing(config) -> dict:
    """What the inputs must look like (for the sidecar JSON)."""
    size = int(config["input"]["image_size"])
    return dict(input_size=[3, size, size], layout="NCHW", mean=list(IMAGENET_MEAN),
                std=list(IMAGENET_STD), range="[0, 1] before normalisation")


def to_timm(encoder_params: dict, config) -> dict:
    """Encoder parameters (either layout) -> {timm name: float32 numpy array}."""
    kw = timm_kwargs(config)
    enc = layout.unrolled({"encoder": encoder_params})["encoder"]
    depth = layout.layer_count(enc)
    if depth != kw["depth"]:
        raise ValueError(f"encoder parameters have {depth} blocks; model.encoder="
                         f"{config['model']['encoder']!r} has {kw['depth']}.")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in convert(enc, kw).items()}


def convert(enc: dict, kw: dict, xp=np) -> dict:
    """The mapping itself, on an unrolled tree, with array functions from `xp` (numpy, or
    jax.numpy under jax.eval_shape to get every timm shape of a model without its memory)."""
    p, width = kw["patch_size"], kw["embed_dim"]
    kernel = enc["patch_embed"]["kernel"]
    chans = kernel.shape[0] // (p * p)
    grid = kw["img_size"] // p
    sd = {
        "pos_embed": xp.asarray(sincos_2d(grid, grid, width)[None]),
        "patch_embed.proj.weight": kernel.reshape(p, p, chans, width).transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": enc["patch_embed"]["bias"],
    }
    for i in range(kw["depth"]):
        b, t = enc[f"block_{i}"], f"blocks.{i}."
        attn = b["attn"]
        qkv = ("query", "key", "value")
        sd.update({
            t + "norm1.weight": b["norm1"]["scale"], t + "norm1.bias": b["norm1"]["bias"],
            t + "attn.qkv.weight": xp.concatenate(
                [attn[n]["kernel"].reshape(width, -1).T for n in qkv], 0),
            t + "attn.qkv.bias": xp.concatenate([attn[n]["bias"].reshape(-1) for n in qkv]),
            t + "attn.proj.weight": attn["out"]["kernel"].reshape(-1, width).T,
            t + "attn.proj.bias": attn["out"]["bias"],
            t + "norm2.weight": b["norm2"]["scale"], t + "norm2.bias": b["norm2"]["bias"],
            t + "mlp.fc1.weight": b["mlp"]["fc1"]["kernel"].T,
            t + "mlp.fc1.bias": b["mlp"]["fc1"]["bias"],
            t + "mlp.fc2.weight": b["mlp"]["fc2"]["kernel"].T,
            t + "mlp.fc2.bias": b["mlp"]["fc2"]["bias"],
        })
    sd["norm.weight"], sd["norm.bias"] = enc["norm"]["scale"], enc["norm"]["bias"]
    return sd


def from_timm(state_dict: dict, config, scan: bool = None, check_pos_embed: bool = True) -> dict:
    """A timm state dict (numpy or torch tensors) -> our encoder parameters, in the layout of
    `config` (model.scan_layers) unless `scan` says otherwise. Our encoder has no learned
    position embedding: `pos_embed` must still be the sin-cos one (ValueError otherwise)."""
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
          for k, v in state_dict.items()}
    kw = timm_kwargs(config)
    p, width, heads = kw["patch_size"], kw["embed_dim"], kw["num_heads"]
    head_dim = width // heads
    if check_pos_embed and "pos_embed" in sd:
        grid = kw["img_size"] // p
        diff = np.abs(sd["pos_embed"] - sincos_2d(grid, grid, width)[None]).max()
        if diff > 1e-5:
            raise ValueError(f"pos_embed differs from the fixed sin-cos embedding by {diff:.3g}; "
                             "our encoder cannot represent a learned position embedding.")
    weight = sd["patch_embed.proj.weight"]                     # (D, C, p, p)
    enc = {"patch_embed": {"kernel": weight.transpose(2, 3, 1, 0).reshape(-1, width),
                           "bias": sd["patch_embed.proj.bias"]},
           "norm": {"scale": sd["norm.weight"], "bias": sd["norm.bias"]}}
    for i in range(kw["depth"]):
        t = f"blocks.{i}."
        q, k, v = np.split(sd[t + "attn.qkv.weight"], 3, axis=0)
        qb, kb, vb = np.split(sd[t + "attn.qkv.bias"], 3)
        proj = lambda w, bias: {"kernel": w.T.reshape(width, heads, head_dim),
                                "bias": bias.reshape(heads, head_dim)}
        enc[f"block_{i}"] = {
            "norm1": {"scale": sd[t + "norm1.weight"], "bias": sd[t + "norm1.bias"]},
            "attn": {"query": proj(q, qb), "key": proj(k, kb), "value": proj(v, vb),
                     "out": {"kernel": sd[t + "attn.proj.weight"].T.reshape(heads, head_dim, width),
                             "bias": sd[t + "attn.proj.bias"]}},
            "norm2": {"scale": sd[t + "norm2.weight"], "bias": sd[t + "norm2.bias"]},
            "mlp": {"fc1": {"kernel": sd[t + "mlp.fc1.weight"].T, "bias": sd[t + "mlp.fc1.bias"]},
                    "fc2": {"kernel": sd[t + "mlp.fc2.weight"].T, "bias": sd[t + "mlp.fc2.bias"]}},
        }
    enc = layout._map(lambda x: np.ascontiguousarray(x, np.float32), enc)
    if scan is None:
        scan = bool(config["model"].get("scan_layers", False))
    return layout.scanned({"encoder": enc})["encoder"] if scan else enc
