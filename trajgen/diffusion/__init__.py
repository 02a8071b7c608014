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
    "DiffusionLoss", "sample_times", "PREDICTIONS", "check_prediction", "conversion_coefficients", "convert",
    "prediction_basis", "target", "EDM", "SCHEDULES", "VE", "Flow", "Schedule", "VPCosine", "VPDiscrete",
    "VPLinear", "linear_betas", "make_schedule", "scaled_linear_betas",
]
