"""The toy problem end to end on the CPU: learn a ring of 8 Gaussians with a small MLP noise predictor,
then sample it with ``ddpm_step`` and ``ddim_step``.

Training noises clean points with ``add_noise`` at random per-sample timesteps and regresses the noise
(epsilon prediction); the MLP's hidden layers use the fused ``GroupNormSiLU``, so its backward runs too.
Quality is the share of samples within ``MODE_RADIUS`` of one of the 8 modes (and how many modes get at
least 5% of the samples); the PNG shows the data, the forward process and each sampler's output.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List, Optional

import torch
from torch import nn

import diffkern

NUM_MODES = 8
RING_RADIUS = 2.0
MODE_STD = 0.08
MODE_RADIUS = 4 * MODE_STD       # a sample "hits" a mode within 4 standard deviations
NUM_TRAIN_TIMESTEPS = 200


def ring_of_gaussians(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 2]`` float32 points from 8 equal Gaussians on a circle of radius 2."""
    modes = torch.randint(0, NUM_MODES, (n,), generator=generator)
    angle = modes.float() * (2 * math.pi / NUM_MODES)
    centres = RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + MODE_STD * torch.randn(n, 2, generator=generator)


def mode_centres() -> torch.Tensor:
    angle = torch.arange(NUM_MODES).float() * (2 * math.pi / NUM_MODES)
    return RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)


class NoisePredictor(nn.Module):
    """eps_theta(x_t, t) for 2-D points: sinusoidal timestep features, three hidden layers of
    Linear -> fused GroupNorm+SiLU."""

    def __init__(self, hidden: int = 128, groups: int = 8, time_features: int = 32):
        super().__init__()
        self.time_features = time_features
        layers: List[nn.Module] = []
        width = 2 + time_features
        for _ in range(3):
            layers += [nn.Linear(width, hidden), diffkern.GroupNormSiLU(groups, hidden)]
            width = hidden
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.time_features // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None, :]
        features = torch.cat([x, angles.sin(), angles.cos()], dim=1)
        return self.net(features)


def train(model: NoisePredictor, table: torch.Tensor, steps: int, generator: torch.Generator,
          batch: int = 256) -> float:
    """Epsilon-prediction training; returns the final loss (mean of the last 100 steps)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    recent: List[float] = []
    for _ in range(steps):
        x0 = ring_of_gaussians(batch, generator)
        noise = torch.randn(batch, 2, generator=generator)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        loss = torch.mean((model(diffkern.add_noise(x0, noise, t, table), t) - noise) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-100:]
    return sum(recent) / len(recent)


@torch.no_grad()
def sample(model: NoisePredictor, table: torch.Tensor, n: int, method: str, num_steps: int, eta: float,
           generator: torch.Generator) -> torch.Tensor:
    """Ancestral DDPM over every timestep, or DDIM over ``num_steps`` evenly spaced ("leading") ones."""
    x = torch.randn(n, 2, generator=generator)
    if method == "ddpm":
        for t in range(NUM_TRAIN_TIMESTEPS - 1, -1, -1):
            eps = model(x, torch.full((n,), t))
            x = diffkern.ddpm_step(eps, t, x, table, generator=generator, clip_sample=False).prev_sample
        return x
    stride = NUM_TRAIN_TIMESTEPS // num_steps
    for t in range(NUM_TRAIN_TIMESTEPS - stride, -1, -stride):
        eps = model(x, torch.full((n,), t))
        x = diffkern.ddim_step(eps, t, x, table, prev_timestep=t - stride, eta=eta, generator=generator,
                               final_alpha_cumprod=1.0).prev_sample
    return x


def quality(samples: torch.Tensor) -> Dict[str, float]:
    """Share of samples within MODE_RADIUS of a mode, and the number of modes holding >= 5% of them."""
    dist = torch.cdist(samples, mode_centres())
    nearest = dist.min(dim=1)
    hit = nearest.values < MODE_RADIUS
    counts = torch.bincount(nearest.indices[hit], minlength=NUM_MODES)
    return {"near_mode": hit.float().mean().item(),
            "modes_covered": int((counts >= 0.05 * len(samples)).sum())}


def plot(path: str, data: torch.Tensor, trajectory: Dict[int, torch.Tensor], results: Dict[str, torch.Tensor],
         scores: Dict[str, Dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Top row: the data and the forward process; bottom row: each sampler's output.
    columns = max(1 + len(trajectory), len(results))
    fig, axes = plt.subplots(2, columns, figsize=(2.6 * columns, 5.8))
    top = [(axes[0, 0], data, "data", "black")] + [
        (ax, points, f"add_noise, t={t}", "tab:gray") for ax, (t, points) in zip(axes[0, 1:], trajectory.items())]
    bottom = [(ax, points, f"{name}\n{100 * scores[name]['near_mode']:.1f}% near a mode, "
                           f"{scores[name]['modes_covered']}/{NUM_MODES} modes", "tab:blue")
              for ax, (name, points) in zip(axes[1], results.items())]
    for ax, points, title, colour in top + bottom:
        ax.scatter(points[:, 0], points[:, 1], s=1, c=colour)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(top):columns].tolist() + axes[1, len(bottom):].tolist():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Optional[str] = "diffkern_demo.png", train_steps: int = 2000, num_samples: int = 2000,
        seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Train, sample, score and (when ``out``) plot; returns the scores per sampler."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    table = diffkern.NoiseSchedule.from_name("squaredcos_cap_v2", NUM_TRAIN_TIMESTEPS).table("cpu")
    model = NoisePredictor()
    start = time.perf_counter()
    loss = train(model, table, train_steps, generator)
    print(f"trained {train_steps} steps in {time.perf_counter() - start:.1f} s, final loss {loss:.3f}")
    samplers = {
        f"DDPM, {NUM_TRAIN_TIMESTEPS} steps": ("ddpm", NUM_TRAIN_TIMESTEPS, 1.0),
        "DDIM, 20 steps, eta=0": ("ddim", 20, 0.0),
        "DDIM, 20 steps, eta=1": ("ddim", 20, 1.0),
    }
    results, scores = {}, {}
    for name, (method, steps, eta) in samplers.items():
        start = time.perf_counter()
        results[name] = sample(model, table, num_samples, method, steps, eta, generator)
        scores[name] = quality(results[name])
        print(f"{name:<24} {100 * scores[name]['near_mode']:5.1f}% of samples near a mode, "
              f"{scores[name]['modes_covered']}/{NUM_MODES} modes covered "
              f"({time.perf_counter() - start:.1f} s)")
    if out:
        data = ring_of_gaussians(num_samples, generator)
        noise = torch.randn(num_samples, 2, generator=generator)
        trajectory = {t: diffkern.add_noise(data, noise, t, table) for t in (20, 60, 120, NUM_TRAIN_TIMESTEPS - 1)}
        plot(out, data, trajectory, results, scores)
        print(f"wrote {out}")
    return scores


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffkern demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="diffkern_demo.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.out, args.train_steps, args.samples, args.seed)
    return 0
