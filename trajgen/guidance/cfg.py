"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper with the model signature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

Model = Callable[..., Tensor]


class ClassifierFreeGuidance:
    """``guided(x_t, t, **cond) = uncond + scale * (cond - uncond)`` from ONE batched network call.

    The conditional and unconditional halves are evaluated together: x_t [B, ...] and t [B] are
    concatenated with themselves to [2B, ...], ``cond[cond_key]`` [B, ...] with its null version, and every
    other tensor keyword whose first dim is B is repeated (non-tensors pass through). Use it wherever a
    model goes: ``sample(ClassifierFreeGuidance(net, 2.0), x_T, ..., cond=obs)``.

    Guidance is applied in the model's own prediction space (eps for a Decision Diffuser eps-model).
    Every prediction conversion is affine and the weights (1 - scale, scale) sum to one, so guiding in
    any other space (x0, v, eps) gives the same result; there is nothing to choose.

    ``scale == 1`` calls the model once on the conditional inputs only (batch B) and returns its output
    unchanged; ``scale == 0`` likewise returns the unconditional output unchanged.

    Args:
        model: ``model(x_t [B, ...], t [B], **cond) -> [B, ...]``.
        scale: guidance weight w (1 = conditional model, 0 = unconditional, > 1 = stronger guidance).
        cond_key: the keyword holding the condition (``cond`` for ``TemporalUnet1d`` / ``DiT1d``).
        null: ``"mask"``: pass ``cond_mask`` False [B] for the unconditional half (the trajgen nets then use
            their learned null embedding; a ``cond_mask`` the caller passes is kept for the conditional
            half); or a tensor broadcastable to ``cond`` used as the null condition.
    """

    def __init__(self, model: Model, scale: float, *, cond_key: str = "cond",
                 null: Literal["mask"] | Tensor = "mask") -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, t, **cond), got {type(model).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not torch.isfinite(torch.tensor(float(scale))):
            raise ValueError(f"scale must be a finite float, got {scale!r}")
        if not isinstance(null, Tensor) and null != "mask":
            raise ValueError(f"null must be 'mask' or a tensor broadcastable to the condition, got {null!r}")
        self.model, self.scale, self.cond_key, self.null = model, float(scale), cond_key, null

    def __repr__(self) -> str:
        null = "'mask'" if isinstance(self.null, str) else f"tensor{tuple(self.null.shape)}"
        return f"ClassifierFreeGuidance(scale={self.scale:g}, cond_key={self.cond_key!r}, null={null})"

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """x_t [B, ...], t [B], cond[cond_key] [B, ...] -> guided prediction [B, ...] (the model's type)."""
        if self.cond_key not in cond or cond[self.cond_key] is None:
            raise ValueError(f"classifier-free guidance needs the condition: pass {self.cond_key}=<tensor [B, ...]>")
        c = cond[self.cond_key]
        if not isinstance(c, Tensor):
            raise TypeError(f"{self.cond_key} must be a tensor [B, ...], got {type(c).__name__}")
        batch = x_t.shape[0]
        if c.shape[0] != batch:
            raise ValueError(f"{self.cond_key} has batch {c.shape[0]}, x_t has batch {batch}")
        if self.scale == 1.0:
            return self.model(x_t, t, **cond)
        if self.scale == 0.0:
            return self.model(x_t, t, **self._null_kwargs(cond, c, batch))
        both = self._doubled_kwargs(cond, c, batch)
        out = self.model(torch.cat([x_t, x_t]), torch.cat([t.expand(batch), t.expand(batch)]), **both)
        if not isinstance(out, Tensor) or out.shape[0] != 2 * batch:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model output has shape {got} for a doubled batch of {2 * batch}; expected [2B, ...]")
        out_c, out_u = out[:batch], out[batch:]
        return out_u + self.scale * (out_c - out_u)

    def _null_condition(self, c: Tensor) -> Tensor:
        try:
            return self.null.to(device=c.device, dtype=c.dtype).expand_as(c)
        except RuntimeError as err:
            raise ValueError(f"null has shape {tuple(self.null.shape)}, not broadcastable to "
                             f"{self.cond_key} {tuple(c.shape)}") from err

    def _null_kwargs(self, cond: dict[str, Any], c: Tensor, batch: int) -> dict[str, Any]:
        if isinstance(self.null, Tensor):
            return {**cond, self.cond_key: self._null_condition(c)}
        return {**cond, "cond_mask": torch.zeros(batch, dtype=torch.bool, device=c.device)}

    def _doubled_kwargs(self, cond: dict[str, Any], c: Tensor, batch: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in cond.items():
            if key == self.cond_key or key == "cond_mask":
                continue
            out[key] = torch.cat([value, value]) if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch else value
        if isinstance(self.null, Tensor):
            out[self.cond_key] = torch.cat([c, self._null_condition(c)])
            if cond.get("cond_mask") is not None:
                out["cond_mask"] = torch.cat([cond["cond_mask"], cond["cond_mask"]])
        else:
            out[self.cond_key] = torch.cat([c, c])
            given = cond.get("cond_mask")
            keep = torch.ones(batch, dtype=torch.bool, device=c.device) if given is None else given
            out["cond_mask"] = torch.cat([keep, torch.zeros(batch, dtype=torch.bool, device=c.device)])
        return out
