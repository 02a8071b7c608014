"""Diffusion core: schedules, prediction conversions and training losses."""

from trajgen.diffusion.losses import DiffusionLoss, sample_times
from trajgen.diffusion.predictions import (
    PREDICTIONS,
    check_prediction,
    conversion_coefficients,
    convert,
    prediction_basis,
    target,
)
from trajgen.diffusion.schedules import (
    EDM,
    SCHEDULES,
    VE,
    Flow,
    Schedule,
    VPCosine,
    VPDiscrete,
    VPLinear,
    linear_betas,
    make_schedule,
    scaled_linear_betas,
)

__all__ = [
    "EDM",
    "PREDICTIONS",
    "SCHEDULES",
    "VE",
    "DiffusionLoss",
    "Flow",
    "Schedule",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "check_prediction",
    "conversion_coefficients",
    "convert",
    "linear_betas",
    "make_schedule",
    "prediction_basis",
    "sample_times",
    "scaled_linear_betas",
    "target",
]
