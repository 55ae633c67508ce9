"""diffkern: fused GPU kernels for diffusion models.

Every op has a pure-PyTorch reference (the definition of right), fused Triton kernels and a CUDA C++
extension behind one API; ``backend="auto"`` picks the fastest one usable for the tensors' device. Importing
the package touches no device, imports no triton and loads no extension.
"""

from diffkern.backends import BackendStatus, BackendUnavailableError, available_backends
from diffkern.ops.add_noise import add_noise
from diffkern.ops.ddim import StepOutput, ddim_step
from diffkern.ops.ddpm import ddpm_step
from diffkern.ops.flow_add_noise import flow_add_noise
from diffkern.ops.flow_match import flow_match_step
from diffkern.ops.group_norm_silu import GroupNormSiLU, group_norm_silu
from diffkern.patching import patch_groupnorm_silu, unpatch_groupnorm_silu
from diffkern.sampling import sample
from diffkern.schedules import NoiseSchedule, alphas_cumprod, make_betas

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "GroupNormSiLU",
    "NoiseSchedule",
    "StepOutput",
    "add_noise",
    "alphas_cumprod",
    "available_backends",
    "ddim_step",
    "ddpm_step",
    "flow_add_noise",
    "flow_match_step",
    "group_norm_silu",
    "make_betas",
    "patch_groupnorm_silu",
    "sample",
    "unpatch_groupnorm_silu",
]
