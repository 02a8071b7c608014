"""PNDM / PLMS (Liu et al. 2022): pseudo linear multistep on the DDIM transfer, noise prediction.

eps' is an Adams-Bashforth combination of the last network outputs (orders 1-4) and the state moves with
the DDIM transfer phi(x, eps', s -> t). For order >= 2 the first step is the pseudo improved-Euler step of
the PLMS reference code (average of eps at both ends), so NFE = steps + 1.
"""

from __future__ import annotations

from trajgen.solvers.dpm_solver import noise_first_order_step, require_alpha
from trajgen.solvers.plan import Lin, PlanBuilder, X
from trajgen.solvers.registry import register

ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


@register("pndm", orders=(1, 2, 3, 4), default_order=4)
def pndm(b: PlanBuilder, order: int) -> None:
    """PLMS with Adams-Bashforth orders up to ``order`` (4 = the paper's PLMS)."""
    P = b.points
    eps: list[Lin] = []
    for i in range(b.num_steps):
        s, t = P[i], P[i + 1]
        require_alpha(b, s)
        eps.append(b.evaluate(s, X, "eps"))
        if i == 0 and order >= 2 and t.sigma > 0:
            x_pred = noise_first_order_step(s, t, X, eps[-1])
            eps_end = b.evaluate(t, x_pred, "eps")
            eps_prime = 0.5 * (eps[-1] + eps_end)
        else:
            k = min(order, len(eps))
            eps_prime = Lin()
            for coef, e in zip(ADAMS_BASHFORTH[k], reversed(eps)):
                eps_prime = eps_prime + coef * e
        b.step(noise_first_order_step(s, t, X, eps_prime), t.t)
