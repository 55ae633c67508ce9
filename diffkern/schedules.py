"""Noise schedules: the beta tables and the cumulative products the ops index into.

Every function here returns float64 tensors on the CPU. The ops take the table in any floating dtype on
any device and gather from it in fp32 (see :func:`diffkern.ops._common.prepare_table`: any other table is copied
once per table version, device and dtype, at its first call); a float32 copy on the sampling device
(``NoiseSchedule.table(device)``) makes even that first call copy nothing.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict

import torch

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "quadratic", "sigmoid")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal's cosine schedule: beta_i = 1 - abar((i+1)/N) / abar(i/N), capped at max_beta.
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1.0 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale ``betas`` so that the last abar is exactly 0 (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"): shift and scale sqrt(abar) so its last value is 0 and its first is
    unchanged. With abar_T = 0, epsilon prediction at t = T-1 is undefined; use v-prediction."""
    sqrt_abar = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def make_betas(
    schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    *,
    rescale_zero_snr: bool = False,
) -> torch.Tensor:
    """The beta table of a named schedule, float64 ``[num_train_timesteps]``.

    - ``linear``: linspace(beta_start, beta_end, N)
    - ``scaled_linear`` and ``quadratic``: linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2
    - ``squaredcos_cap_v2`` (alias ``cosine``): 1 - f((i+1)/N) / f(i/N) capped at 0.999,
      f(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2 (beta_start/beta_end unused)
    - ``sigmoid``: sigmoid(linspace(-6, 6, N)) * (beta_end - beta_start) + beta_start

    These are diffusers' formulas, evaluated in float64 (diffusers rounds to float32).
    """
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    n = num_train_timesteps
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    elif schedule in ("scaled_linear", "quadratic"):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    elif schedule in ("squaredcos_cap_v2", "cosine"):
        betas = _cosine_betas(n)
    else:  # sigmoid
        betas = torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    if rescale_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s), in the dtype of ``betas`` (float64 from :func:`make_betas`)."""
    _check_betas(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _check_betas(betas) -> None:
    if not isinstance(betas, torch.Tensor) or betas.ndim != 1 or not betas.is_floating_point():
        got = f"{betas.dtype} tensor of shape {tuple(betas.shape)}" if isinstance(betas, torch.Tensor) \
            else type(betas).__name__
        raise TypeError(f"betas must be a 1-D floating-point tensor, got {got}")
    if betas.numel() == 0 or not bool(((betas >= 0) & (betas <= 1)).all()):
        raise ValueError("betas must be non-empty with every value in [0, 1]")


class NoiseSchedule:
    """Holds a schedule's betas and alphas_cumprod (float64, CPU) and caches float32 copies per device.

    >>> sched = NoiseSchedule.from_name("scaled_linear", beta_start=0.00085, beta_end=0.012)
    >>> table = sched.table("cuda")   # pass this as ``alphas_cumprod`` to the ops
    """

    def __init__(self, betas: torch.Tensor):
        _check_betas(betas)
        self.betas = betas.double().cpu()
        self.alphas_cumprod = alphas_cumprod(self.betas)
        self._tables: Dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_name(cls, schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, *, rescale_zero_snr: bool = False) -> "NoiseSchedule":
        return cls(make_betas(schedule, num_train_timesteps, beta_start, beta_end, rescale_zero_snr=rescale_zero_snr))

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    def table(self, device="cpu") -> torch.Tensor:
        """The float32 alphas_cumprod table on ``device``; copied there once."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device=device, dtype=torch.float32)
        return self._tables[device]

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps})"
