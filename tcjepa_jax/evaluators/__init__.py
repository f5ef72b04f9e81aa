"""Evaluators of a frozen encoder, one file each: `config.probe.evaluators` names them.

An evaluator module defines

    evaluate(features: _features.Features, config) -> dict[str, float]

which fits whatever it needs on `features.train` and reports on `features.test` (keys are
task names or metric names; tcjepa_jax/evaluation.py logs them as eval/<evaluator>/<key>).
Adding an evaluator is adding one file here and naming it in the config. Modules whose names
start with "_" are shared helpers, not evaluators.

An evaluator that reads the trained model itself rather than the frozen encoder's features
(e.g. grounding: where the predictor's cross-attention goes) defines instead

    evaluate_model(model: Model, config) -> dict[str, float]

It is skipped where no Model is at hand, and may return {} where it does not apply.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, NamedTuple


class Model(NamedTuple):
    """What a model evaluator reads: host copies of the trained parameters."""
    models: Any          # step.Models
    params: dict         # {"encoder" (the context encoder), "predictor", "text"?}
    tokenizer: Any       # data.tokenizer.Tokenizer; None in I-JEPA mode
    cache: dict          # kept for the whole run: an evaluator's held-out data, loaded once


def reads_model(name: str) -> bool:
    return hasattr(get(name), "evaluate_model")


def available_evaluators() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if not m.name.startswith("_")))


def get(name: str):
    if name not in available_evaluators():
        raise ValueError(f"unknown evaluator {name!r} in config.probe.evaluators; available: "
                         f"{', '.join(available_evaluators())}.")
    return importlib.import_module(f"{__name__}.{name}")
