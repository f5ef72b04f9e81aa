"""Random-access data sources, one file each: `config.input.source = NAME` reads through NAME.py.

A source module defines `make(input_cfg, split)`, returning an object with `__len__` and
`__getitem__(index) -> record` that pickles cheaply (Grain ships it to its worker processes), and
raises ValueError / FileNotFoundError with a message saying what to fix when the config points at
data that is not there. A record is a dict:

    image      encoded bytes (JPEG, PNG, ...: decoded in the worker) or uint8 (H, W, 3)
    captions   list of str (or bytes); cleaned in the worker, bad sentences dropped and counted
    id         str, the image's id or file name (caption files are joined on it)
    label      int, optional; -1 when the record has none

A source may raise decode.BadRecord (or any exception) from __getitem__ for a record it cannot
read: the pipeline skips it and counts it by kind. Adding a source is adding one file here.
"""

from __future__ import annotations

import importlib
import pkgutil


def available_sources() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def make_source(input_cfg, split: str):
    """The random-access source named by `input_cfg.source`, for `split`."""
    name = input_cfg.source
    if name not in available_sources():
        raise ValueError(f"Unknown config.input.source={name!r}; valid sources: "
                         f"{', '.join(available_sources())}.")
    return importlib.import_module(f"{__name__}.{name}").make(input_cfg, split)
