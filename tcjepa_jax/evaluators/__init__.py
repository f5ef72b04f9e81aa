"""Evaluators of a frozen encoder, one file each: `config.probe.evaluators` names them.

An evaluator module defines

    evaluate(features: _features.Features, config) -> dict[str, float]

which fits whatever it needs on `features.train` and reports on `features.test` (keys are
task names or metric names; tcjepa_jax/evaluation.py logs them as eval/<evaluator>/<key>).
Adding an evaluator is adding one file here and naming it in the config. Modules whose names
start with "_" are shared helpers, not evaluators.
"""

from __future__ import annotations

import importlib
import pkgutil


def available_evaluators() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if not m.name.startswith("_")))


def get(name: str):
    if name not in available_evaluators():
        raise ValueError(f"unknown evaluator {name!r} in config.probe.evaluators; available: "
                         f"{', '.join(available_evaluators())}.")
    return importlib.import_module(f"{__name__}.{name}")
