"""The sparsity and consistency penalties on the text conditioner (docs/method.md, section 8).

Every variant (`loss.penalty`) is one map per conditioned layer, (B,N,T,S) over (caption,
token, word), built by `penalty_map` from the conditioner's projected queries and keys:

    cosine        O = max(cos(Q_i, K_s), 0), all heads concatenated (the paper's)
    standardized  Z = max(z_s, 0) / S_n, z = the cosines of a (token, caption) pair
                  standardised over the caption's S_n valid words
    attention     A = the cross-attention softmax over the caption's words, averaged over heads

and by `text_penalties` into L_sparse (per (token, caption) pair: sum over words of O or Z; the
entropy of A over log S_n for `attention`) and L_consistency (the paper's L1 distance of each
layer's map from the layers' mean; for `attention` the Jensen-Shannon divergence of the layers'
distributions over log S_n, see _pair_consistency).

Why the variants: the paper's O is zero, with zero gradient, once every cosine is negative, and
both penalties are minimised there. A component shared by every key adds the same amount to all
of a query's logits, so it leaves the attention (and L_pred) unchanged and nothing resists it.
Z and A cannot be zeroed by such a shift: Z is invariant to a shift and a rescaling of a pair's
cosines, A to a shift of a query's logits.
"""
import jax
import jax.numpy as jnp

PENALTIES = ("cosine", "standardized", "attention")
# Variance floor of the standardised cosines (cosines of random vectors in width W spread by
# about 1/sqrt(W), a variance of 1e-3 at W = 1024).
STD_EPS = 1e-6
# A clamp inside log(A), so that A log A has a finite gradient where a weight underflows to 0.
LOG_FLOOR = 1e-30


def _unit(x):
    """x / max(|x|, 1e-6) over the last axis, with a finite gradient at x = 0 (where
    jnp.linalg.norm's is NaN: a zero key, e.g. a zeroed padding word, must not poison the
    gradient through the masked entries)."""
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def cosine(qp, kp):
    """cos(Q_i, K_s) over the concatenated heads: qp (B,T,H,D), kp (B,N,S,H,D) -> (B,N,T,S)."""
    b, t = qp.shape[:2]
    n, s = kp.shape[1:3]
    qf = _unit(qp.reshape(b, t, -1).astype(jnp.float32))
    kf = _unit(kp.reshape(b, n, s, -1).astype(jnp.float32))
    return jnp.einsum("btd,bnsd->bnts", qf, kf)


def attention_weights(qp, kp, text_mask):
    """The conditioner's softmax over each caption's words (predictor.attend_captions), float32:
    qp (B,T,H,D), kp (B,N,S,H,D), text_mask (B,N,S) -> (B,N,H,T,S)."""
    logits = jnp.einsum("bthd,bnshd->bnhts", qp, kp).astype(jnp.float32) * qp.shape[-1] ** -0.5
    logits = jnp.where(text_mask[:, :, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def num_words(text_mask):
    """Valid words per caption as float32, (B,N,1,1) to broadcast over (B,N,T,S)."""
    return text_mask.sum(-1).astype(jnp.float32)[:, :, None, None]


def penalty_map(penalty: str, qp, kp, text_mask):
    """The (B,N,T,S) float32 map of one conditioned layer; 0 at padding words."""
    text_mask = text_mask.astype(bool)
    words = text_mask[:, :, None, :]
    if penalty == "cosine":
        m = jnp.maximum(cosine(qp, kp), 0.0)
    elif penalty == "standardized":
        c = cosine(qp, kp)
        s_n = jnp.maximum(num_words(text_mask), 1.0)
        mean = jnp.where(words, c, 0.0).sum(-1, keepdims=True) / s_n
        d = jnp.where(words, c - mean, 0.0)
        var = (d * d).sum(-1, keepdims=True) / s_n
        m = jnp.maximum(d * jax.lax.rsqrt(var + STD_EPS), 0.0) / s_n
    elif penalty == "attention":
        m = attention_weights(qp, kp, text_mask).mean(2)
    else:
        raise ValueError(f"loss.penalty={penalty!r}; expected one of {PENALTIES}.")
    return jnp.where(words, m, 0.0)


def _normalised_entropy(a, text_mask):
    """Entropy over the last axis / log S_n: 1 for uniform weights on the caption's words. A
    caption with one valid word has nothing to choose from and scores 0."""
    ent = -(a * jnp.log(jnp.maximum(a, LOG_FLOOR))).sum(-1)
    s_n = num_words(text_mask)[..., 0]                                     # (B,N,1)
    return jnp.where(s_n > 1, ent / jnp.log(jnp.maximum(s_n, 2.0)), 0.0)


def _pair_sparsity(penalty: str, o, text_mask):
    """(L,B,N,T): the sparsity of each layer's (token, caption) pair."""
    if penalty != "attention":
        return o.sum(-1)
    return _normalised_entropy(o, text_mask)


def _pair_consistency(penalty: str, o, text_mask):
    """(B,N,T): how far the layers' maps of a pair are from their mean.

    For attention, H(mean_l A_l) - mean_l H(A_l) (the Jensen-Shannon divergence of the layers'
    distributions, = mean_l KL(A_l || mean_l A_l)) rather than the L1 distance: attention starts
    uniform in every layer, where the entropy's gradient vanishes (uniform is its maximum) but
    an L1 distance's does not, so the L1 form holds every layer at uniform (measured: 1000
    times the entropy's gradient on the q / k kernels at initialisation, and no layer left
    uniform in 300 steps). Both JS terms are flat at agreement, as the entropy is at uniform.
    """
    if penalty != "attention":
        return jnp.abs(o - o.mean(0, keepdims=True)).sum(-1).mean(0)
    return (_normalised_entropy(o.mean(0), text_mask)
            - _normalised_entropy(o, text_mask).mean(0))


def _active(penalty: str, o, text_mask):
    """Entries above the map's own baseline: O > 0, z > 0, or A above the uniform 1 / S_n."""
    if penalty == "attention":
        return o > 1.0 / jnp.maximum(num_words(text_mask), 1.0)
    return o > 0


def text_penalties(os: list, token_valid, text_mask, caption_valid,
                   penalty: str = "cosine") -> dict:
    """L_sparse, L_consistency and per-layer statistics of the maps (docs/method.md).

    os: per conditioned layer the (B,N,T,S) map of `penalty_map`; token_valid (B,T);
    text_mask (B,N,S); caption_valid (B,N). Means run over valid (token, caption) pairs of the
    whole batch. o_mean / o_frac_pos: the map's mean and its fraction above baseline
    (`_active`), over valid (token, caption, word) triples.
    """
    if not os:
        zero = jnp.zeros((), jnp.float32)
        return dict(sparse=zero, consistency=zero, o_mean=jnp.zeros((0,), jnp.float32),
                    o_frac_pos=jnp.zeros((0,), jnp.float32))
    o = jnp.stack(os)                                                      # (L,B,N,T,S)
    caption_valid = caption_valid & text_mask.any(-1)  # as in TextConditioner
    pair = (caption_valid[:, :, None] & token_valid[:, None, :]).astype(jnp.float32)  # (B,N,T)
    word = pair[..., None] * text_mask[:, :, None, :].astype(jnp.float32)  # (B,N,T,S)
    num_pairs = jnp.maximum(pair.sum(), 1.0)
    sparse = (_pair_sparsity(penalty, o, text_mask) * pair).sum() / (num_pairs * o.shape[0])
    consistency = (_pair_consistency(penalty, o, text_mask) * pair).sum() / num_pairs
    total_words = jnp.maximum(word.sum(), 1.0)
    active = _active(penalty, o, text_mask)
    return dict(sparse=sparse, consistency=consistency,
                o_mean=(o * word).sum((1, 2, 3, 4)) / total_words,
                o_frac_pos=(active * word).sum((1, 2, 3, 4)) / total_words)
