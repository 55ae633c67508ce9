"""Triton 3.6's interpreter, fixed for the GroupNorm kernels' loops over runtime bounds.

The looped and split kernels (and the dweight/dbias row sum) loop over runtime bounds,
``for c_tile in range(c_begin, c_end)``: the ordinary Triton idiom, which every supported Triton compiles
(``scripts/compile_triton_kernels.py``). The interpreter runs such a loop with Python's ``range``, which
calls ``__index__`` on the bound, a scalar held as a 1-element NumPy array. Triton 3.6 (pinned by torch
2.10 and 2.11) implements that as ``int(array)``, which NumPy 2.4 turned from a deprecation warning into
``TypeError: only 0-dimensional arrays can be converted to Python scalars`` (triton-lang/triton#9171;
Triton 3.7 reads ``int(array.squeeze())``). On Triton 3.6 only, importing the package installs 3.7's
definition into the interpreter (``fix_triton36_interpreter``); compiled kernels are not affected.
"""

from __future__ import annotations

from typing import Tuple

import triton


def _triton_version() -> Tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def fix_triton36_interpreter() -> bool:
    """On Triton 3.6, make the interpreter's ``tensor.__index__`` read a 1-element array as 3.7 does (see the
    module docstring). Returns whether the interpreter now carries the fix; a no-op on other versions."""
    if _triton_version() != (3, 6):
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "diffkern_index_fix", False):
        return True

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor.diffkern_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True

