"""Trajectory anchors and coordinates for the driving policies (DiffusionDrive's plan anchors and norm_odo).

A plan is [H, 3] ego-frame poses (x, y, heading) in metres and radians. ``kmeans_anchors`` clusters training
plans into K anchors; ``nearest_anchor`` picks the anchor a ground-truth plan belongs to (the classification
target); ``TrajectoryNormalizer`` maps plans to [-1, 1] per coordinate, the space the diffusion runs in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn


def _check_trajectories(trajectories: np.ndarray | Tensor, name: str) -> np.ndarray:
    """float64 array [S, H, 3] without NaN, or ValueError naming ``name``."""
    array = trajectories.detach().cpu().numpy() if isinstance(trajectories, Tensor) else np.asarray(trajectories)
    if array.ndim != 3 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"{name} must have shape [S, H, 3] (x, y, heading) with S >= 1, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    return array.astype(np.float64)


def kmeans_anchors(trajectories: np.ndarray | Tensor, k: int = 20, seed: int = 0,
                   position_scale: Sequence[float] | None = None) -> Tensor:
    """K anchor plans from k-means over the flattened (x, y) waypoints of training plans.

    The clustering uses positions only (as DiffusionDrive's anchors). Each anchor's heading is the circular
    mean of its members' headings at every pose (atan2 of the mean sin and cos), so a turning cluster gets
    the heading its drivers actually had rather than the tangent of the averaged path.

    In metres the distance is dominated by the spread of speeds along the road, so most centres are straight
    plans at different speeds; ``position_scale`` = (sx, sy) clusters x / sx and y / sy instead (e.g. the
    normaliser's half ranges, the space the diffusion runs in), which gives turns more centres. The centres
    are scaled back to metres.

    Args:
        trajectories: [S, H, 3] ego-frame plans (x, y, heading), S >= k.
        k: number of anchors.
        seed: k-means initialisation seed.
        position_scale: (sx, sy) > 0, or None to cluster in metres.
    Returns:
        anchors [k, H, 3] float32, sorted by cluster size (largest first) so the order is reproducible.
    """
    from sklearn.cluster import KMeans

    array = _check_trajectories(trajectories, "trajectories")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if len(array) < k:
        raise ValueError(f"kmeans_anchors needs at least k={k} trajectories, got {len(array)}")
    scale = np.ones(2) if position_scale is None else np.asarray(position_scale, dtype=np.float64)
    if scale.shape != (2,) or not np.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError(f"position_scale must be two finite values > 0 (sx, sy), got {position_scale!r}")
    positions = (array[..., :2] / scale).reshape(len(array), -1)
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(positions)
    labels = kmeans.labels_
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    anchors = np.zeros((k,) + array.shape[1:], dtype=np.float64)
    for slot, cluster in enumerate(order):
        members = array[labels == cluster]
        anchors[slot, :, :2] = kmeans.cluster_centers_[cluster].reshape(-1, 2) * scale
        anchors[slot, :, 2] = np.arctan2(np.sin(members[..., 2]).mean(0), np.cos(members[..., 2]).mean(0))
    return torch.as_tensor(anchors, dtype=torch.float32)


def nearest_anchor(trajectory: Tensor, anchors: Tensor) -> Tensor:
    """Index of the anchor closest to each plan: argmin_k mean_h ||xy_h - anchor_k,h||_2 (DiffusionDrive).

    Args:
        trajectory: [B, H, 3] plans.
        anchors: [K, H, 3] or per-sample [B, K, H, 3].
    Returns:
        [B] int64 anchor indices.
    """
    if trajectory.ndim != 3 or anchors.shape[-2:] != trajectory.shape[-2:]:
        raise ValueError(f"trajectory [B, H, 3] and anchors [K, H, 3] disagree: {tuple(trajectory.shape)} vs "
                         f"{tuple(anchors.shape)}")
    distance = torch.linalg.vector_norm(trajectory[:, None, :, :2] - anchors[..., :2], dim=-1).mean(-1)
    return distance.argmin(dim=-1)


class TrajectoryNormalizer(nn.Module):
    """Affine map of plans to [-1, 1] per coordinate: u = 2 (p - low) / (high - low) - 1 (DiffusionDrive's norm_odo).

    ``low`` / ``high`` are the (x, y, heading) bounds, e.g. DiffusionDrive's (-1.2, -20, -2) / (55.7, 26, 1.9)
    on NAVSIM. The bounds are non-persistent buffers: they come from the policy config, not the weights.
    """

    def __init__(self, low: Sequence[float], high: Sequence[float]) -> None:
        super().__init__()
        low_t, high_t = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        if low_t.shape != (3,) or high_t.shape != (3,) or not bool((high_t > low_t).all()):
            raise ValueError(f"normaliser bounds must be 3 values each with high > low, got low={list(low)}, "
                             f"high={list(high)}")
        self.register_buffer("low", low_t, persistent=False)
        self.register_buffer("high", high_t, persistent=False)

    def normalize(self, trajectory: Tensor, first: int = 0) -> Tensor:
        """[..., C] metres/radians -> [..., C] in [-1, 1] inside the bounds. The C values are the coordinates
        ``first`` .. ``first + C - 1`` of (x, y, heading): [..., 3] whole poses, [..., 2] (x, y), or ``first=2``
        with [..., 1] the heading alone."""
        low, high = self._bounds(trajectory, first)
        return 2.0 * (trajectory - low) / (high - low) - 1.0

    def denormalize(self, normalized: Tensor, first: int = 0) -> Tensor:
        """Inverse of :meth:`normalize`: [..., C] -> [..., C] metres/radians."""
        low, high = self._bounds(normalized, first)
        return (normalized + 1.0) * 0.5 * (high - low) + low

    def _bounds(self, values: Tensor, first: int) -> tuple[Tensor, Tensor]:
        end = first + values.shape[-1]
        if first < 0 or end > 3:
            raise ValueError(f"coordinates {first}..{end - 1} are not among (x, y, heading) = 0..2")
        return self.low[first:end], self.high[first:end]


def trajectory_bounds(trajectories: np.ndarray | Tensor, margin: float = 0.1) -> tuple[list[float], list[float]]:
    """Per-coordinate (low, high) of a set of plans [S, H, 3], widened by ``margin`` of the range on each side;
    put them in a policy config's ``norm_low`` / ``norm_high``."""
    array = _check_trajectories(trajectories, "trajectories")
    low, high = array.reshape(-1, 3).min(0), array.reshape(-1, 3).max(0)
    pad = margin * np.maximum(high - low, 1e-3)
    return (low - pad).tolist(), (high + pad).tolist()
