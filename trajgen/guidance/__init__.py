"""Model wrappers that steer sampling: classifier-free guidance, gradient guidance, inpainting."""

from trajgen.guidance.cfg import ClassifierFreeGuidance
from trajgen.guidance.gradient import GradientGuidance
from trajgen.guidance.inpainting import Inpainting, condition_on_first_state

__all__ = ["ClassifierFreeGuidance", "GradientGuidance", "Inpainting", "condition_on_first_state"]
