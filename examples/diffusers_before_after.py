"""A diffusers sampling loop before and after diffkern: the stock ``DDIMScheduler`` and UNet, then the same
loop with ``FusedDDIMScheduler`` and the UNet's GroupNorm -> SiLU pairs fused. Prints how far apart they end.

The change is two lines::

    scheduler = FusedDDIMScheduler.from_config(scheduler.config)   # pipe.scheduler = ... in a pipeline
    patch_groupnorm_silu(unet)                                      # returns the number of fused sites

The UNet is a small random-init ``UNet2DModel``, so this runs on a CPU in seconds and needs no download; point
it at a real checkpoint with ``UNet2DModel.from_pretrained`` and the loop is unchanged. Timings are printed on
a GPU only: on a CPU diffkern runs its PyTorch reference, which exists to be right, not fast.

    python examples/diffusers_before_after.py
    python examples/diffusers_before_after.py --device cuda --size 64 --steps 50
"""

from __future__ import annotations

import argparse
import time

import torch

try:
    from diffusers import DDIMScheduler, UNet2DModel
except ImportError as exc:
    raise SystemExit("this example needs diffusers: pip install diffkern[diffusers]") from exc

from diffkern.integrations.diffusers import FusedDDIMScheduler
from diffkern.patching import patch_groupnorm_silu


def denoise(unet, scheduler, x_T: torch.Tensor, steps: int, eta: float, seed: int) -> torch.Tensor:
    """What a diffusers pipeline does: set_timesteps, then model -> step for each timestep."""
    scheduler.set_timesteps(steps, device=x_T.device)
    generator = torch.Generator(x_T.device).manual_seed(seed)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x


def timed(fn, device: torch.device):
    """``fn()`` and its wall time; on a GPU after one untimed run (cuDNN autotuning, Triton compilation)."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eta", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    unet = UNet2DModel(sample_size=args.size, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).to(device).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    x_T = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    x_T = x_T.to(device)

    with torch.no_grad():
        before, before_s = timed(lambda: denoise(unet, scheduler, x_T, args.steps, args.eta, args.seed), device)

        # After: the two-line change.
        scheduler = FusedDDIMScheduler.from_config(scheduler.config)
        sites = patch_groupnorm_silu(unet)

        after, after_s = timed(lambda: denoise(unet, scheduler, x_T, args.steps, args.eta, args.seed), device)

    print(f"{args.steps} DDIM steps (eta {args.eta}) on {args.batch}x3x{args.size}x{args.size}, {device}; "
          f"fused {sites} GroupNorm->SiLU sites")
    print(f"max |after - before| = {(after - before).abs().max().item():.2e} "
          f"(sample values up to {before.abs().max().item():.2f})")
    if device.type == "cuda":
        print(f"before {before_s * 1e3:.1f} ms, after {after_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
