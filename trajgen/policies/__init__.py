"""Policies: the method families (anchored truncated diffusion, vanilla diffusion, regression, Trajectory Diffuser and its baselines); no env code here."""
