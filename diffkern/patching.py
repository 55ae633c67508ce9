"""Route a model's GroupNorm -> SiLU pairs through the fused :func:`diffkern.group_norm_silu`, and back.

:func:`patch_groupnorm_silu` finds three kinds of sites in a module tree and patches them in place, keeping every
parameter (the fused modules share the original ``Parameter`` objects, so ``state_dict``, optimizers and
``load_state_dict`` are unaffected) and the outputs (to fp32 rounding):

1. diffusers ``ResnetBlock2D`` (or a subclass that does not override ``forward``) whose ``nonlinearity`` is
   ``nn.SiLU`` and whose norms are ``nn.GroupNorm``: the block gets an instance ``forward`` that computes what
   diffusers' does, with ``norm1`` -> SiLU fused, and ``norm2`` -> SiLU fused when ``time_embedding_norm`` is not
   ``"scale_shift"`` (with ``scale_shift`` a per-channel affine sits between norm2 and SiLU, so only norm1 is
   fused). The block's modules are untouched: the SiLU applied to the time embedding stays a plain SiLU.
   One site per fused norm.
2. ``nn.Sequential`` (or a subclass that does not override ``forward``) holding an ``nn.GroupNorm`` directly
   followed by an ``nn.SiLU``: the pair becomes ``GroupNormSiLU.from_group_norm(gn)`` + ``nn.Identity()``, so the
   indices of the other entries stay. One site per pair.
3. The final ``conv_norm_out`` (``nn.GroupNorm``) + ``conv_act`` (``nn.SiLU``) of diffusers' ``UNet2DModel``,
   ``UNet2DConditionModel`` and the VAE ``Encoder``/``Decoder`` (classes whose forward applies the two back to
   back): replaced like a Sequential pair. One site.

Only exact ``nn.GroupNorm``/``nn.SiLU`` modules qualify (a subclass may compute something else), and a
``ResnetBlock2D`` that already has an instance ``forward`` (e.g. an offloading hook) is left alone. Patching
twice patches nothing new. :func:`unpatch_groupnorm_silu` restores the original modules and forwards.

diffusers is never imported here: its classes are recognised through ``sys.modules``, where they necessarily are
if the model contains their instances.

Patch before wrapping the model (``torch.compile``, hooks, DDP); hooks registered on a replaced GroupNorm or SiLU
do not carry over to the fused module.
"""

from __future__ import annotations

import sys
import types
from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from diffkern import backends
from diffkern.ops.group_norm_silu import GroupNormSiLU, group_norm_silu

__all__ = ["patch_groupnorm_silu", "unpatch_groupnorm_silu"]

# Attribute names of the undo records kept on patched modules (plain Python objects, not submodules, so they
# stay out of state_dict and named_modules).
_PAIRS_ATTR = "_diffkern_fused_pairs"
_RESNET_ATTR = "_diffkern_fused_resnet"

# (module, class) of diffusers models whose forward applies conv_norm_out then conv_act with nothing between
# (checked against diffusers 0.42).
_CONV_NORM_OUT_OWNERS = (
    ("diffusers.models.unets.unet_2d", "UNet2DModel"),
    ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel"),
    ("diffusers.models.autoencoders.vae", "Encoder"),
    ("diffusers.models.autoencoders.vae", "Decoder"),
)


class _Pair(NamedTuple):
    """Undo record of one replaced (norm, activation) pair: the original modules and the activation's name."""
    norm: nn.GroupNorm
    act: nn.Module
    act_name: str


class _ResnetPatch(NamedTuple):
    fuse_norm1: bool
    fuse_norm2: bool
    backend: str


def patch_groupnorm_silu(model: nn.Module, *, backend: str = "auto") -> int:
    """Fuse every GroupNorm -> SiLU site of ``model`` in place (the sites are listed in the module docstring).

    Args:
        model: any ``nn.Module``; a model without GroupNorm -> SiLU is left exactly as it is.
        backend: ``auto``, ``reference``, ``triton`` or ``cuda``, for the fused op.

    Returns:
        The number of sites patched (one per fused GroupNorm).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backends.check_backend_name(backend)
    resnet_cls = _diffusers_class("diffusers.models.resnet", "ResnetBlock2D")
    owners = tuple(cls for cls in (_diffusers_class(*key) for key in _CONV_NORM_OUT_OWNERS) if cls is not None)
    patched = 0
    # Collect first: patching replaces modules, which must not happen while named_modules() iterates.
    for module in list(model.modules()):
        if resnet_cls is not None and isinstance(module, resnet_cls):
            patched += _patch_resnet(module, resnet_cls, backend)
        elif isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            names = list(module._modules)
            for norm_name, act_name in zip(names, names[1:]):
                patched += _patch_pair(module, norm_name, act_name, backend)
        if type(module) in owners:
            patched += _patch_pair(module, "conv_norm_out", "conv_act", backend)
    return patched


def unpatch_groupnorm_silu(model: nn.Module) -> int:
    """Undo :func:`patch_groupnorm_silu` on ``model``: the original GroupNorm/SiLU modules go back in place
    (holding the current parameters) and patched blocks get their class ``forward`` back.

    Returns:
        The number of sites restored. Raises ``RuntimeError``, before changing anything, if a patched site was
        modified since (a fused module replaced, or a block's ``forward`` wrapped).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.named_modules())
    for name, module in modules:
        _check_restorable(name or type(model).__name__, module)
    restored = 0
    for _, module in modules:
        restored += _restore_pairs(module) + _restore_resnet(module)
    return restored


def _diffusers_class(module_name: str, class_name: str) -> Optional[type]:
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def _is_group_norm(module) -> bool:
    return type(module) is nn.GroupNorm


def _is_silu(module) -> bool:
    return type(module) is nn.SiLU


# --- GroupNorm + SiLU module pairs (Sequential entries, conv_norm_out + conv_act) -------------------------------

def _patch_pair(owner: nn.Module, norm_name: str, act_name: str, backend: str) -> int:
    norm, act = owner._modules.get(norm_name), owner._modules.get(act_name)
    if not (_is_group_norm(norm) and _is_silu(act)):
        return 0
    fused = GroupNormSiLU.from_group_norm(norm, backend=backend)
    fused.train(norm.training)
    identity = nn.Identity()
    identity.train(act.training)
    pairs: Dict[str, _Pair] = owner.__dict__.setdefault(_PAIRS_ATTR, {})
    pairs[norm_name] = _Pair(norm, act, act_name)
    # Assigning to existing names keeps their position in _modules (a Sequential's order).
    setattr(owner, norm_name, fused)
    setattr(owner, act_name, identity)
    return 1


def _pair_is_intact(owner: nn.Module, norm_name: str, pair: _Pair) -> bool:
    return isinstance(owner._modules.get(norm_name), GroupNormSiLU) \
        and type(owner._modules.get(pair.act_name)) is nn.Identity


def _restore_pairs(owner: nn.Module) -> int:
    pairs: Dict[str, _Pair] = owner.__dict__.pop(_PAIRS_ATTR, {})
    for norm_name, pair in pairs.items():
        fused, identity = owner._modules[norm_name], owner._modules[pair.act_name]
        # Re-point the original at the parameters in use now, in case a conversion replaced them.
        pair.norm.weight, pair.norm.bias = fused.weight, fused.bias
        pair.norm.train(fused.training)
        pair.act.train(identity.training)
        setattr(owner, norm_name, pair.norm)
        setattr(owner, pair.act_name, pair.act)
    return len(pairs)


# --- diffusers ResnetBlock2D ------------------------------------------------------------------------------------

def _patch_resnet(block: nn.Module, resnet_cls: type, backend: str) -> int:
    if type(block).forward is not resnet_cls.forward or "forward" in block.__dict__:
        return 0  # a subclass with its own forward, already patched, or wrapped by someone else
    if not (_is_silu(block.nonlinearity) and _is_group_norm(block.norm1)):
        return 0
    fuse_norm2 = _is_group_norm(block.norm2) and block.time_embedding_norm != "scale_shift"
    block.__dict__[_RESNET_ATTR] = _ResnetPatch(True, fuse_norm2, backend)
    block.forward = types.MethodType(_fused_resnet_forward, block)
    return 1 + int(fuse_norm2)


def _resnet_is_intact(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_resnet_forward


def _restore_resnet(block: nn.Module) -> int:
    patch: Optional[_ResnetPatch] = block.__dict__.pop(_RESNET_ATTR, None)
    if patch is None:
        return 0
    del block.__dict__["forward"]
    return int(patch.fuse_norm1) + int(patch.fuse_norm2)


def _check_restorable(name: str, module: nn.Module) -> None:
    for norm_name, pair in module.__dict__.get(_PAIRS_ATTR, {}).items():
        if not _pair_is_intact(module, norm_name, pair):
            raise RuntimeError(f"cannot unpatch {name}.{norm_name}: the fused module or the Identity that "
                               f"replaced {pair.act_name!r} was replaced since patching")
    if _RESNET_ATTR in module.__dict__ and not _resnet_is_intact(module):
        raise RuntimeError(f"cannot unpatch {name}: its forward was replaced or wrapped since patching "
                           "(remove hooks before unpatching)")


def _norm_silu(norm: nn.GroupNorm, act: nn.Module, x: torch.Tensor, fused: bool, backend: str) -> torch.Tensor:
    if fused:
        return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, backend=backend)
    return act(norm(x))


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args,
                          **kwargs) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D.forward`` (0.42) with norm -> SiLU fused where the patch record says so.

    The block computes, with h = input_tensor:
        h = silu(norm1(h)); h, input_tensor = resample(h), resample(input_tensor)   # when up/down
        h = conv1(h); temb = time_emb_proj(silu(temb))[:, :, None, None]          # silu unless skip_time_act
        default:     h = silu(norm2(h + temb))
        scale_shift: scale, shift = temb.chunk(2, dim=1); h = silu(norm2(h) * (1 + scale) + shift)
        out = (shortcut(input_tensor) + conv2(dropout(h))) / output_scale_factor
    """
    if args or kwargs.get("scale") is not None:
        # The deprecated ``scale`` argument: let diffusers' own forward warn about it (unfused).
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    patch: _ResnetPatch = self.__dict__[_RESNET_ATTR]
    hidden = _norm_silu(self.norm1, self.nonlinearity, input_tensor, patch.fuse_norm1, patch.backend)
    if self.upsample is not None:
        if hidden.shape[0] >= 64:
            # diffusers makes large batches contiguous before upsampling (a workaround it carries); kept.
            input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
        input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
    elif self.downsample is not None:
        input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
    hidden = self.conv1(hidden)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)  # the time embedding's SiLU stays unfused
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden = self.nonlinearity(self.norm2(hidden) * (1 + time_scale) + time_shift)
    else:
        if self.time_embedding_norm == "default" and temb is not None:
            hidden = hidden + temb
        hidden = _norm_silu(self.norm2, self.nonlinearity, hidden, patch.fuse_norm2, patch.backend)
    hidden = self.conv2(self.dropout(hidden))
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()  # as diffusers does in training
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden) / self.output_scale_factor
