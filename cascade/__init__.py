"""Stable Cascade (Würstchen v3) in PyTorch: the stages, the GDF sampler, weight loading and in-process generation.

This package imports no Ray, S3 or Parquet code; `workers/` and `jobs/` build the distributed pipeline on top of it.
"""

from .family import BUILTIN_MODELS, CascadeModels, load_models, tiny_models
from .geometry import OFFICIAL, Geometry
from .pipeline import PriorOutput, Request, Result, generate, run_decoder, run_prior
from .stage_a import STAGE_A, StageA, StageAConfig
from .stage_b import STAGE_B_3B, STAGE_B_700M, StageB, StageBConfig
from .stage_c import STAGE_C_1B, STAGE_C_3B, StageC, StageCConfig
from .weights import WeightsError, load_stage, save_stage

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS",
    "CascadeModels",
    "Geometry",
    "OFFICIAL",
    "PriorOutput",
    "Request",
    "Result",
    "STAGE_A",
    "STAGE_B_3B",
    "STAGE_B_700M",
    "STAGE_C_1B",
    "STAGE_C_3B",
    "StageA",
    "StageAConfig",
    "StageB",
    "StageBConfig",
    "StageC",
    "StageCConfig",
    "WeightsError",
    "generate",
    "load_models",
    "load_stage",
    "run_decoder",
    "run_prior",
    "save_stage",
    "tiny_models",
]
