"""End to end: a 50-step DDIM sampling loop over a randomly initialised diffusers ``UNet2DModel``.

Variants, all over the same model weights, initial noise and timesteps (SD 1.5's DDIM schedule):

- ``diffusers``: the loop a diffusers pipeline runs: ``unet(x, t)`` then ``DDIMScheduler.step`` (the baseline);
- ``diffkern_step``: the same loop with :func:`diffkern.ddim_step` as the step;
- ``diffkern_step_patched``: plus every GroupNorm -> SiLU pair of a copy of the UNet replaced by the fused op
  (``diffkern.patching.patch_groupnorm_silu``);
- ``diffkern_graph``: the patched loop, all 50 steps captured once in a CUDA graph and timed by replaying it
  (GPU only; diffusers' step reads timesteps on the host, so the baseline loop cannot be captured).

One call is one whole loop, timed by :func:`diffkern.bench.measure` like the ops (``triton.testing.do_bench`` on a
GPU, ``torch.utils.benchmark`` on a CPU); the time per step is the loop's time / 50. On a GPU the UNet has SD
1.5's widths at 64^2 latents in fp16; on CPU a tiny UNet in fp32 only exercises the harness.
"""

from __future__ import annotations

import copy
from typing import Any, Dict

import pytest
import torch

import diffkern
from cases import DEVICE, LOOP, SD_DDIM_EXTRA, SD_SCHEDULER
from diffkern import bench

VARIANTS = ("diffusers", "diffkern_step", "diffkern_step_patched", "diffkern_graph")

# Timed milliseconds per variant: on a GPU about 5 s of loops (do_bench adds its estimate of 5 loops and a warm-up
# of a quarter of that); on a CPU none beyond the minimum, one loop to size the block and one timed, which only
# shows that the harness runs.
REP_MS = 5000.0 if DEVICE.type == "cuda" else 0.0


class Loop:
    """The model, inputs and schedule shared by every variant, and the measurements of this run."""

    def __init__(self):
        diffusers = pytest.importorskip("diffusers")
        with torch.device(DEVICE):
            # Random weights: the benchmark measures time, and every variant runs the same weights.
            torch.manual_seed(0)
            self.unet = diffusers.UNet2DModel(**LOOP.unet).to(LOOP.dtype).eval()
        self.scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER, **SD_DDIM_EXTRA)
        self.scheduler.set_timesteps(LOOP.steps, device=DEVICE)
        self.timesteps = self.scheduler.timesteps
        # The scheduler's own table, so that outputs are comparable with the baseline's.
        self.table = self.scheduler.alphas_cumprod.to(device=DEVICE, dtype=torch.float32)
        self.prev_timesteps = torch.cat([self.timesteps[1:], self.timesteps.new_full((1,), -1)])
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        self.x_T = torch.randn(LOOP.latent_shape, generator=gen, device=DEVICE).to(LOOP.dtype)
        self.patched = None
        self.patched_count = None
        self.results: Dict[str, Dict[str, Any]] = {}

    # The loops -------------------------------------------------------------------------------------------------

    def diffusers_loop(self) -> torch.Tensor:
        with torch.no_grad():
            self.scheduler.set_timesteps(LOOP.steps, device=DEVICE)   # a pipeline does this every call
            x = self.x_T
            for t in self.scheduler.timesteps:
                x = self.scheduler.step(self.unet(x, t).sample, t, x).prev_sample
            return x

    def diffkern_loop(self, unet, x_T: torch.Tensor) -> torch.Tensor:
        # Indexing the device timesteps with a Python int is a view: no host sync, so the loop is capturable.
        with torch.no_grad():
            x = x_T
            for i in range(LOOP.steps):
                t = self.timesteps[i]
                out = unet(x, t).sample
                x = diffkern.ddim_step(out, t, x, self.table, prev_timestep=self.prev_timesteps[i],
                                       final_alpha_cumprod=self.final_alpha_cumprod).prev_sample
            return x

    def patched_unet(self):
        if self.patched is None:
            try:
                from diffkern.patching import patch_groupnorm_silu
            except ModuleNotFoundError as exc:
                if exc.name != "diffkern.patching":
                    raise
                pytest.skip("diffkern.patching (patch_groupnorm_silu) does not exist yet")
            self.patched = copy.deepcopy(self.unet)
            self.patched_count = patch_groupnorm_silu(self.patched)
        return self.patched

    def graph_replay(self):
        """Capture the patched loop once (after eager warm-up runs on a side stream, as CUDA graphs require);
        returns a function that replays all 50 steps."""
        unet = self.patched_unet()
        static_x = self.x_T.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.diffkern_loop(unet, static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.diffkern_loop(unet, static_x)

        def replay() -> torch.Tensor:
            graph.replay()
            return static_out
        return replay

    def variant(self, name: str):
        if name == "diffusers":
            return self.diffusers_loop
        if name == "diffkern_step":
            return lambda: self.diffkern_loop(self.unet, self.x_T)
        if name == "diffkern_step_patched":
            unet = self.patched_unet()
            return lambda: self.diffkern_loop(unet, self.x_T)
        if DEVICE.type != "cuda":
            pytest.skip("CUDA graphs need a CUDA device")
        return self.graph_replay()

    # Measuring -------------------------------------------------------------------------------------------------

    def run(self, name: str) -> Dict[str, Any]:
        """Measure one variant (the diffusers baseline first, if it has not run yet): its figures, the measurement
        and its final sample."""
        loop = self.variant(name)
        final = loop()   # the first run: compilation, lazy initialisation, and the output to compare
        m = bench.measure(loop, DEVICE, REP_MS)
        info = {"variant": name, "model": LOOP.label, "latent_shape": list(LOOP.latent_shape),
                "dtype": str(LOOP.dtype).replace("torch.", ""), "steps": LOOP.steps, "timer": m.timer,
                "samples": len(m.samples_s), "median_ms": m.median_s * 1e3, "min_ms": m.min_s * 1e3,
                "ms_per_step": m.median_s * 1e3 / LOOP.steps}
        if name != "diffusers":
            baseline = self.results.get("diffusers") or self.run("diffusers")
            info["speedup_vs_diffusers"] = baseline["measurement"].median_s / m.median_s
            info["max_abs_diff_vs_diffusers"] = float((final.double() - baseline["final"].double()).abs().max())
        if name in ("diffkern_step_patched", "diffkern_graph"):
            info["groupnorm_silu_patched"] = self.patched_count
        info["final"] = final.detach().clone()
        info["measurement"] = m
        self.results[name] = info
        return info


@pytest.fixture(scope="module")
def loop() -> Loop:
    return Loop()


@pytest.mark.parametrize("variant", VARIANTS)
def test_ddim_loop(loop, variant, benchmark, record):
    benchmark.group = f"ddim {LOOP.steps} steps, {LOOP.label} {LOOP.latent_shape} {str(LOOP.dtype)[6:]}"
    info = loop.run(variant)
    benchmark.extra_info.update({k: v for k, v in info.items() if k not in ("final", "measurement")})
    benchmark.extra_info["device"] = str(DEVICE)
    record(info["measurement"])
