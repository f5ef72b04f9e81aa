"""Captioned synthetic scenes: the embedded default dataset.

Each record is a procedurally drawn image with 1..max_objects coloured shapes on a cheap random
texture, plus several caption sentences in the style of machine-generated detailed captions, plus
labels for probes. Everything is a pure function of (seed, split, index): the source is random
access, infinite in practice (``size`` is only what ``len`` reports) and picklable.

Record format (dict):
    image          uint8 (S, S, 3)
    captions       list[str]: a summary sentence, one sentence per object, relation sentences and a
                   background sentence, in a deterministic shuffled order
    label_count    int, number of objects (probe class = label_count - 1)
    label_shape    int, index into SHAPES of the largest object
    label_color    int, index into COLORS of the largest object
    segmentation   uint8 (S, S): 0 = background, 1 + shape id of the top-most object at the pixel

The largest object (largest radius) is drawn last, so it is never occluded and its shape id is
always present in ``segmentation``. Object positions are drawn with a light rejection step so
objects overlap little and every object stays visible and its caption stays true.

``SyntheticScenes.grounded(index)`` returns the same record plus what only the grounding evaluator
reads (never the training batch): ``objects`` int8 (S, S), the index of the top-most object at
each pixel (-1 = background), and ``caption_words``, per caption its words (split on spaces, so
" ".join gives the caption back) with the index of the object each word names (-1 = none).
A word names an object when it is one of the size, colour or shape words of that object's noun
phrase ("a small red circle", "the red circle"); articles, counts, positions, relations and the
background sentence name none.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
_RGB = np.array([
    (215, 40, 40),  # red
    (40, 165, 60),  # green
    (45, 80, 220),  # blue
    (235, 215, 40),  # yellow
    (135, 55, 175),  # purple
    (245, 135, 25),  # orange
    (40, 205, 215),  # cyan
    (245, 120, 185),  # pink
], dtype=np.float32)
SIZES = ("small", "large")
_RADIUS = (0.12, 0.20)  # fraction of the image side, before a +-10% jitter
# The largest radius, 0.20 * 1.1 * scale, must leave the object room inside the image (< 0.5).
MAX_OBJECT_SCALE = 2.25
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SPLIT_IDS = {"train": 0, "validation": 1, "val": 1, "test": 2}
_SALT = 0x7C5E  # separates this generator's streams from other users of the same seed
_TEXTURES = ("noisy", "shaded", "striped")
# "textured": one of _TEXTURES at a random brightness and tint; "plain": one mid-grey with a
# little pixel noise, so that the objects are the only thing that varies between images.
BACKGROUNDS = ("textured", "plain")
_PLAIN_GREY = 120.0

NUM_CLASSES = {"count": 4, "shape": len(SHAPES), "color": len(COLORS)}  # at max_objects=4


def _split_id(split: str) -> int:
    if split in _SPLIT_IDS:
        return _SPLIT_IDS[split]
    return 16 + zlib.crc32(split.encode("utf-8"))  # any other name: its own stream


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([_SALT, *words])))


def _shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Inside test on coordinates normalised by the radius (dy grows downwards)."""
    name = SHAPES[shape]
    if name == "circle":
        return dx * dx + dy * dy <= 1.0
    if name == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85
    if name == "triangle":  # apex up, base down
        return (dy <= 0.8) & (np.abs(dx) <= (dy + 0.95) / 1.75)
    if name == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= 0.33) & (ay <= 1.0)) | ((ay <= 0.33) & (ax <= 1.0))
    if name == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= 1.0) & (d2 >= 0.3)
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15
    raise ValueError(name)


def _position_phrase(cx: float, cy: float) -> str:
    row = 0 if cy < 1 / 3 else (1 if cy < 2 / 3 else 2)
    col = 0 if cx < 1 / 3 else (1 if cx < 2 / 3 else 2)
    return (
            ("in the upper left", "at the top", "in the upper right"),
            ("on the left", "in the centre", "on the right"),
            ("in the lower left", "at the bottom", "in the lower right"),
    )[row][col]


class SyntheticScenes:
    """Random-access source of captioned synthetic scenes (see module docstring)."""

    def __init__(
            self,
            image_size: int = 64,
            seed: int = 0,
            split: str = "train",
            size: int = 1_000_000,
            min_objects: int = 1,
            max_objects: int = 4,
            object_scale: float = 1.0,
            background: str = "textured",
    ):
        if not 1 <= min_objects <= max_objects <= 9:
            raise ValueError(f"Need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}.")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}.")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.split = split
        self.size = int(size)
        self.min_objects = int(min_objects)
        self.max_objects = int(max_objects)
        if not 0.25 <= object_scale <= MAX_OBJECT_SCALE:
            raise ValueError(f"object_scale must be in [0.25, {MAX_OBJECT_SCALE}], "
                             f"got {object_scale}.")
        self.object_scale = float(object_scale)
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}.")
        self.background = background
        self._split_id = _split_id(split)
        s = self.image_size
        self._yy, self._xx = np.mgrid[0:s, 0:s].astype(np.float32)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"SyntheticScenes(image_size={self.image_size}, seed={self.seed}, split={self.split!r}, "
                        f"size={self.size}, objects={self.min_objects}..{self.max_objects}, "
                        f"background={self.background!r})")

    def __getitem__(self, index: int) -> dict:
        return self._draw(index, grounded=False)

    def grounded(self, index: int) -> dict:
        """The record of ``index`` plus ``objects`` and ``caption_words`` (module docstring)."""
        return self._draw(index, grounded=True)

    def _draw(self, index: int, grounded: bool) -> dict:
        index = int(index)
        if index < 0:
            index += self.size
        rng = _rng(self.seed, self._split_id, index)
        s = self.image_size
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        shapes = rng.integers(0, len(SHAPES), n)
        colors = rng.integers(0, len(COLORS), n)
        sizes = rng.integers(0, 2, n)
        radii = np.asarray(_RADIUS)[sizes] * self.object_scale * rng.uniform(0.9, 1.1, n) * s
        centres = self._place(rng, radii)

        image, texture = self._background(rng)
        seg = np.zeros((s, s), np.uint8)
        objects = np.full((s, s), -1, np.int8)
        order = np.argsort(radii, kind="stable")  # largest drawn last: never occluded
        jitter = rng.uniform(-18, 18, (n, 3)).astype(np.float32)
        for k in order:
            r, (cx, cy) = radii[k], centres[k]
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, s)
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, s)
            dx = (self._xx[y0:y1, x0:x1] + 0.5 - cx) / r
            dy = (self._yy[y0:y1, x0:x1] + 0.5 - cy) / r
            inside = _shape_mask(int(shapes[k]), dx, dy)
            image[y0:y1, x0:x1][inside] = _RGB[colors[k]] + jitter[k]
            seg[y0:y1, x0:x1][inside] = 1 + shapes[k]
            objects[y0:y1, x0:x1][inside] = k
        largest = int(order[-1])

        words = self._captions(rng, shapes, colors, sizes, centres / s, texture)
        record = {
                "image": np.clip(image, 0, 255).astype(np.uint8),
                "captions": [" ".join(w for w, _ in sentence) for sentence in words],
                "label_count": n,
                "label_shape": int(shapes[largest]),
                "label_color": int(colors[largest]),
                "segmentation": seg,
        }
        if grounded:
            record.update(objects=objects, caption_words=words)
        return record

    # --- drawing -----------------------------------------------------------------------------------

    def _place(self, rng: np.random.Generator, radii: np.ndarray) -> np.ndarray:
        """Centres (n, 2) in pixels, objects inside the image and overlapping little."""
        s, tries = self.image_size, 24
        centres = np.zeros((len(radii), 2))
        for k, r in enumerate(radii):
            cand = rng.uniform(r, s - r, (tries, 2))
            if k == 0:
                centres[k] = cand[0]
                continue
            dist = np.linalg.norm(cand[:, None, :] - centres[None, :k, :], axis=-1)  # (tries, k)
            slack = (dist / (0.95 * (r + radii[None, :k]))).min(axis=1)
            ok = np.flatnonzero(slack >= 1.0)
            centres[k] = cand[ok[0] if len(ok) else int(np.argmax(slack))]
        return centres

    def _background(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        s = self.image_size
        if self.background == "plain":
            noise = rng.normal(0, 4, (s, s)).astype(np.float32)
            return np.repeat((_PLAIN_GREY + noise)[..., None], 3, axis=-1), "plain"
        kind = int(rng.integers(0, len(_TEXTURES)))
        base = rng.uniform(70, 170)
        tint = rng.uniform(-18, 18, 3).astype(np.float32)
        angle = rng.uniform(0, np.pi)
        proj = (np.cos(angle) * self._xx + np.sin(angle) * self._yy) / s
        if kind == 0:  # noisy
            tex = rng.normal(0, 10, (s, s)).astype(np.float32)
        elif kind == 1:  # shaded: linear gradient
            tex = (proj - 0.7) * rng.uniform(30, 60) + rng.normal(0, 4, (s, s)).astype(np.float32)
        else:  # striped
            period = rng.uniform(4, 14) / s
            tex = 14 * np.sin(2 * np.pi * proj / period) + rng.normal(0, 4, (s, s)).astype(np.float32)
        return (base + tex)[..., None] + tint, _TEXTURES[kind]

    # --- captions ----------------------------------------------------------------------------------

    def _captions(self, rng, shapes, colors, sizes, centres01, texture) -> list:
        """Caption sentences as lists of (word, index of the object it names or -1)."""
        n = len(shapes)

        def phrase(article, k, with_size=True):
            attrs = [SIZES[sizes[k]]] if with_size else []
            attrs += [COLORS[colors[k]], SHAPES[shapes[k]]]
            return [(article, -1)] + [(w, int(k)) for w in attrs]

        def punct(words, mark):
            return words[:-1] + [(words[-1][0] + mark, words[-1][1])]

        items = [phrase("a", k) for k in range(n)]
        listed = items[0]
        if n > 1:  # "x, y and z"
            listed = [w for item in items[:-2] for w in punct(item, ",")] + items[-2] \
                + [("and", -1)] + items[-1]
        noun = "object" if n == 1 else "objects"
        sentences = [punct([(_NUMBERS[n], -1), (noun + ":", -1)] + listed, ".")]
        for k in range(n):
            where = _position_phrase(*centres01[k])
            sentences.append(punct(phrase("a", k) + [(w, -1) for w in where.split()], "."))
        if n >= 2:
            perm = rng.permutation(n)
            for a, b in zip(perm[:-1], perm[1:]):  # n - 1 relations along a random chain
                dx, dy = centres01[b] - centres01[a]
                if abs(dy) >= abs(dx):
                    rel = "above" if dy > 0 else "below"
                else:
                    rel = "to the left of" if dx > 0 else "to the right of"
                sentences.append(punct(phrase("the", a, False) + [("is", -1)]
                                       + [(w, -1) for w in rel.split()]
                                       + phrase("the", b, False), "."))
        sentences.append(punct([(w, -1) for w in f"the background is {texture}".split()], "."))
        return [sentences[i] for i in rng.permutation(len(sentences))]


def iter_captions(seed: int = 0, n: int = 2000, image_size: int = 64,
                                    max_objects: int = 4) -> Iterator[str]:
    """Yields caption sentences of ``n`` synthetic scenes (a tokenizer training corpus)."""
    src = SyntheticScenes(image_size=image_size, seed=seed, split="tokenizer", max_objects=max_objects)
    for i in range(n):
        yield from src[i]["captions"]
