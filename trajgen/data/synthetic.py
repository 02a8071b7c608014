"""Synthetic planar trajectories with known modes: a small, exact test bed for trajectory diffusion.

A vehicle starts at the origin heading +y and drives ``horizon`` steps along a circular arc whose signed
curvature is one of ``curvatures`` (left / straight / right manoeuvres), at a random speed. Every
trajectory is therefore described by (mode, speed), so the quality of generated trajectories can be
measured exactly: fit the arc, read off curvature and speed, and check the fit residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ArcTrajectories:
    """Arc manoeuvres: positions [H, 2] at ``dt`` spacing.

    Args:
        horizon: number of future waypoints H.
        curvatures: signed curvature (1/m) of each mode.
        weights: mode probabilities (normalised).
        speed_range: uniform range of speeds (m/s).
        dt: time between waypoints (s).
    """

    horizon: int = 16
    curvatures: tuple[float, ...] = (0.35, 0.0, -0.35)
    weights: tuple[float, ...] = (0.3, 0.4, 0.3)
    speed_range: tuple[float, float] = (2.0, 3.0)
    dt: float = 0.25

    def __post_init__(self) -> None:
        if len(self.curvatures) != len(self.weights):
            raise ValueError(f"curvatures ({len(self.curvatures)}) and weights ({len(self.weights)}) must match")
        if self.horizon < 3:
            raise ValueError(f"horizon must be >= 3, got {self.horizon}")

    def trajectory(self, curvature: Tensor, speed: Tensor) -> Tensor:
        """Waypoints [B, H, 2] for curvatures and speeds [B]: arc length s_k = v dt k, k = 1..H."""
        s = speed[:, None] * self.dt * torch.arange(1, self.horizon + 1, dtype=speed.dtype, device=speed.device)
        kappa = curvature[:, None]
        small = kappa.abs() < 1e-9
        safe = torch.where(small, torch.ones_like(kappa), kappa)
        # heading +y; turning left (kappa > 0) bends towards -x
        x = torch.where(small, torch.zeros_like(s), (torch.cos(safe * s) - 1.0) / safe)
        y = torch.where(small, s, torch.sin(safe * s) / safe)
        return torch.stack([x, y], dim=-1)

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(trajectories [n, H, 2], mode indices [n])."""
        weights = torch.tensor(self.weights, dtype=torch.float64)
        modes = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=generator)
        lo, hi = self.speed_range
        speed = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        kappa = torch.tensor(self.curvatures, dtype=torch.float64)[modes]
        return self.trajectory(kappa, speed).to(dtype), modes

    def fit(self, traj: Tensor) -> dict[str, Tensor]:
        """Best arc per trajectory [B, H, 2] (grid search over curvature, closed-form least squares speed is
        not linear, so both are searched): returns curvature, speed, rmse [B] and nearest mode [B]."""
        traj = traj.detach().to(torch.float64)
        kappas = torch.linspace(-0.6, 0.6, 121, dtype=torch.float64)
        lo, hi = self.speed_range
        speeds = torch.linspace(0.5 * lo, 1.5 * hi, 81, dtype=torch.float64)
        K, V = torch.meshgrid(kappas, speeds, indexing="ij")
        bank = self.trajectory(K.reshape(-1), V.reshape(-1))  # [M, H, 2]
        dist = torch.cdist(traj.reshape(len(traj), -1), bank.reshape(len(bank), -1))  # [B, M]
        best = dist.argmin(dim=1)
        curvature, speed = K.reshape(-1)[best], V.reshape(-1)[best]
        rmse = dist.gather(1, best[:, None])[:, 0] / (self.horizon**0.5)
        modes = torch.tensor(self.curvatures, dtype=torch.float64)
        nearest = (curvature[:, None] - modes[None]).abs().argmin(dim=1)
        return {"curvature": curvature, "speed": speed, "rmse": rmse, "mode": nearest}
