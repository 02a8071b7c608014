"""trajgen: diffusion-based trajectory generation for robotics."""

__version__ = "0.1.0"
