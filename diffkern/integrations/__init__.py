"""Drop-in adapters for other libraries. Each lives in its own submodule and imports its library there, so
importing ``diffkern`` or ``diffkern.integrations`` never imports them:

- :mod:`diffkern.integrations.diffusers`: ``FusedDDIMScheduler`` and ``FusedDDPMScheduler``, subclasses of
  diffusers' schedulers whose ``step`` and ``add_noise`` run on diffkern (``pip install diffkern[diffusers]``).

Patching a model's GroupNorm -> SiLU pairs (:mod:`diffkern.patching`) works on diffusers models without importing
diffusers either.
"""
