"""Stable Cascade (Würstchen v3) in PyTorch: the stages, the GDF sampler, weight loading and in-process generation.

This package imports no Ray, S3 or Parquet code; `workers/` and `jobs/` build the distributed pipeline on top of it.
Its names load on first use: `import cascade.request` (or `cascade.geometry`) stays free of torch and transformers,
which is what the pipeline's CPU tasks need and several seconds less start-up for each of their processes.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "family": ("BUILTIN_MODELS", "CascadeModels", "load_models", "tiny_models"),
    "geometry": ("Geometry", "OFFICIAL"),
    "pipeline": ("PriorOutput", "Result", "generate", "run_decoder", "run_prior"),
    "request": ("Request",),
    "stage_a": ("STAGE_A", "StageA", "StageAConfig"),
    "stage_b": ("STAGE_B_3B", "STAGE_B_700M", "StageB", "StageBConfig"),
    "stage_c": ("STAGE_C_1B", "STAGE_C_3B", "StageC", "StageCConfig"),
    "weights": ("WeightsError", "load_stage", "save_stage"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:  # an AttributeError lets `from cascade import gdf` find the submodule
        raise AttributeError(f"module 'cascade' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
