"""Timestep lists and the SDE/ODE inversion and sampling formulas (ALGORITHM.md §0, §4-6).

Everything here is plain math on the noise schedule; no model is called. The UNet is passed in as a
callable ``eps(x, t_index)`` so the same formulas drive the eager and the compiled backends.

Notation (ALGORITHM.md §0): ``ᾱ_t = alphas_cumprod[t]``; ``T`` the sampler's timestep grid for
``steps``; ``Δ = 1000 // steps``; ``S = int(start_t * steps)``; ``E = int(end_t * steps)``.
All coefficients are computed with float32 0-d tensors, as the reference does, and handed to the
step loop as Python floats (exactly the float32 values), so the loop never reads a device tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from .params import integer, real

_SPACINGS = ("linspace", "leading", "trailing")


def alphas_cumprod_from_config(config: Mapping) -> torch.Tensor:
    """``ᾱ`` (float32, ``num_train_timesteps`` entries) from a diffusers scheduler config.

    ``scaled_linear`` (SD-1.x): ``β_i = linspace(√β_start, √β_end, N)_i²``; ``linear``: ``β = linspace(β_start, β_end, N)``;
    ``ᾱ_t = ∏_{i≤t} (1 - β_i)``.
    """
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    kind = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported; allowed: 'scaled_linear', 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


def timestep_grid(steps: int, config: Mapping) -> np.ndarray:
    """The grid ``T`` (descending int64) that DPMSolverMultistepScheduler.set_timesteps(steps) gives.

    The reference reads only this list from that scheduler (ALGORITHM.md §0). SD-1.5's config has no
    ``timestep_spacing`` key, so the default ``linspace`` applies:
    ``T = round_half_even(linspace(0, N-1, steps+1))`` reversed, last element dropped.
    """
    n = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        grid = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        grid = (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1] + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        grid = np.arange(n, 0, -n / steps).round() - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported; allowed: {', '.join(_SPACINGS)}")
    return grid.astype(np.int64)


@dataclass(frozen=True)
class StepCoeffs:
    """Coefficients of one inversion or sampling step (Python floats holding float32 values)."""

    t_model: int  # timestep fed to the UNet
    c_prev: float  # multiplier of x in the first line of the step
    c_noise: float  # multiplier of the noise (σ or the SDE forward noise scale)
    sqrt_1m_a: float  # sqrt(1 - a) at the level the UNet sees
    sqrt_a: float  # sqrt(a) at the level the UNet sees
    sqrt_a_next: float  # sqrt(a) of the level the step lands on (or came from, for SDE inversion)
    c_eps: float  # multiplier of ε in the last line
    sigma: float


def _f(x: torch.Tensor) -> float:
    return float(x.to(torch.float32))


@dataclass(frozen=True)
class Schedule:
    """Timestep lists and per-step coefficients of one edit (ALGORITHM.md §4-6).

    ``forward`` holds the S inversion steps (ascending levels), ``backward`` the S sampling steps
    (descending). Backward step i pairs with forward step S-1-i.
    """

    steps: int
    start_t: float
    end_t: float
    sde: bool
    grid: np.ndarray  # T
    forward_t: tuple[int, ...]  # F
    backward_t: tuple[int, ...]  # B
    copy_mask: tuple[bool, ...]  # t >= E per backward step (QUIRK: E is a step count, t a timestep)
    forward: tuple[StepCoeffs, ...]
    backward: tuple[StepCoeffs, ...]

    @property
    def num_steps(self) -> int:
        """S: the number of inversion steps, equal to the number of sampling steps."""
        return len(self.forward_t)


def make_schedule(steps: int, start_t: float, end_t: float, sde: bool, config: Mapping,
                  alphas_cumprod: torch.Tensor | None = None) -> Schedule:
    """Build the timestep lists and every step's coefficients for one edit."""
    n_levels = int(config.get("num_train_timesteps", 1000))
    # Bounded by the schedule's levels before anything is allocated: a grid of more steps than levels
    # repeats timesteps (and 10**9 steps would not fit in memory).
    steps = integer("steps", steps, 2, n_levels)
    start_t = real("start_t", start_t, 0.0, 1.0, lo_open=True, hi_open=True)
    end_t = real("end_t", end_t, 0.0, 1.0)
    s = int(start_t * steps)  # truncation, as the reference
    e = int(end_t * steps)
    if not 1 <= s <= steps - 1:
        raise ValueError(f"int(start_t * steps) = {s} must lie in [1, steps-1] = [1, {steps - 1}]; "
                         f"raise start_t or steps")
    ac = alphas_cumprod_from_config(config) if alphas_cumprod is None else alphas_cumprod.to(torch.float32)
    grid = timestep_grid(steps, config)
    if (np.diff(grid) >= 0).any():
        raise ValueError(f"steps={steps} repeats timesteps on this scheduler's {n_levels}-level grid "
                         f"({config.get('timestep_spacing', 'linspace')} spacing); use fewer steps")
    delta = n_levels // steps
    fwd_t = tuple(int(t) for t in grid[steps - s:steps][::-1])
    bwd_t = tuple(int(t) for t in grid[steps - s - 1:steps - 1])
    # QUIRK (§9b): E is a step count compared with a timestep value; with the defaults it never
    # disables copy-paste. Reproduced as is.
    copy_mask = tuple(t >= e for t in bwd_t)
    if fwd_t[-1] + delta > len(ac) - 1:
        raise ValueError(f"steps={steps}, start_t={start_t} inverts to level {fwd_t[-1] + delta}, beyond the "
                         f"schedule's last level {len(ac) - 1}; use more steps or a smaller start_t")
    fwd = tuple((_sde_forward if sde else _ode_forward)(ac, t, t + delta) for t in fwd_t)
    bwd = tuple(_sample_coeffs(ac, t, t - delta, sde) for t in bwd_t)
    return Schedule(steps, start_t, end_t, sde, grid, fwd_t, bwd_t, copy_mask, fwd, bwd)


def _alpha(ac: torch.Tensor, t: int) -> torch.Tensor:
    # ᾱ for t < 0 is 1 (never reached on the forward path; QUIRK §4: z0 sits at level F[0], not 0).
    return ac[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float32)


def _sde_forward(ac: torch.Tensor, s: int, u: int) -> StepCoeffs:
    """§5 SDE (η = 1) from level s to u = s + Δ; the UNet runs at the NEW level u."""
    a_s, a_u = _alpha(ac, s), _alpha(ac, u)
    sigma = torch.sqrt((1 - a_s) / (1 - a_u)) * torch.sqrt(1 - a_u / a_s)
    return StepCoeffs(t_model=u, c_prev=_f(torch.sqrt(a_u / a_s)), c_noise=_f(torch.sqrt(1 - a_u / a_s)),
                      sqrt_1m_a=_f(torch.sqrt(1 - a_u)), sqrt_a=_f(torch.sqrt(a_u)), sqrt_a_next=_f(torch.sqrt(a_s)),
                      c_eps=_f(torch.sqrt(1 - a_s - sigma**2)), sigma=_f(sigma))


def _ode_forward(ac: torch.Tensor, s: int, u: int) -> StepCoeffs:
    """§5 ODE (DDIM inversion) from s to u; the UNet runs at the CURRENT level s."""
    a_s, a_u = _alpha(ac, s), _alpha(ac, u)
    return StepCoeffs(t_model=s, c_prev=1.0, c_noise=0.0, sqrt_1m_a=_f(torch.sqrt(1 - a_s)),
                      sqrt_a=_f(torch.sqrt(a_s)), sqrt_a_next=_f(torch.sqrt(a_u)),
                      c_eps=_f(torch.sqrt(1 - a_u)), sigma=0.0)


def _sample_coeffs(ac: torch.Tensor, t: int, p: int, sde: bool) -> StepCoeffs:
    """§6 one sampling step from level t to p = t - Δ."""
    a_t, a_p = _alpha(ac, t), _alpha(ac, p)
    if sde:
        sigma = torch.sqrt((1 - a_p) / (1 - a_t)) * torch.sqrt(1 - a_t / a_p)
    else:
        sigma = torch.tensor(0.0, dtype=torch.float32)
    return StepCoeffs(t_model=t, c_prev=1.0, c_noise=_f(sigma), sqrt_1m_a=_f(torch.sqrt(1 - a_t)),
                      sqrt_a=_f(torch.sqrt(a_t)), sqrt_a_next=_f(torch.sqrt(a_p)),
                      c_eps=_f(torch.sqrt(1 - a_p - sigma**2)), sigma=_f(sigma))


Eps = Callable[[torch.Tensor, int], torch.Tensor]


def forward_sde_step(c: StepCoeffs, x_s: torch.Tensor, xi: torch.Tensor, eps: Eps) -> tuple[torch.Tensor, torch.Tensor]:
    """§5 SDE: ``x_u = √(a_u/a_s)·x_s + √(1-a_u/a_s)·ξ``; ε = ε(x_u, u); return ``(x_u, n)`` where
    ``n = (x_s - √a_s·x̂0 - √(1-a_s-σ²)·ε) / σ`` and ``x̂0 = (x_u - √(1-a_u)·ε) / √a_u``."""
    x_u = c.c_prev * x_s + c.c_noise * xi
    e = eps(x_u, c.t_model)
    x0 = (x_u - c.sqrt_1m_a * e) / c.sqrt_a
    n = (x_s - c.sqrt_a_next * x0 - c.c_eps * e) / c.sigma
    return x_u, n


def forward_ode_step(c: StepCoeffs, x_s: torch.Tensor, eps: Eps) -> torch.Tensor:
    """§5 ODE: ε = ε(x_s, s); ``x̂0 = (x_s - √(1-a_s)·ε)/√a_s``; ``x_u = √a_u·x̂0 + √(1-a_u)·ε``."""
    e = eps(x_s, c.t_model)
    x0 = (x_s - c.sqrt_1m_a * e) / c.sqrt_a
    return c.sqrt_a_next * x0 + c.c_eps * e


def sample_step(c: StepCoeffs, x_t: torch.Tensor, noise: torch.Tensor, eps: Eps) -> torch.Tensor:
    """§6: ε = ε(x_t, t); ``x̂0 = (x_t - √(1-a_t)·ε)/√a_t``; ``x_p = √a_p·x̂0 + √(1-a_p-σ²)·ε + σ·n``."""
    e = eps(x_t, c.t_model)
    x0 = (x_t - c.sqrt_1m_a * e) / c.sqrt_a
    return c.sqrt_a_next * x0 + c.c_eps * e + c.sigma * noise
