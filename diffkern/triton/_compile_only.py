"""Triton without a GPU, compiling for real: a driver that reports a CUDA target and launches nothing.

Triton's interpreter (what the tests run the kernels in) never lowers a kernel; the tools that need the real
compiler on a machine without a GPU (``scripts/compile_triton_kernels.py``, ``scripts/kernel_report.py`` and
``bench --host``'s measurement of Triton's own launch path) make this driver Triton's active one. It answers what
compiling asks (a target, a device index, a stream) and refuses everything a launch would need. Triton's bundled
``ptxas`` produces the cubins. Not used by any op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver as triton_driver


class CompileOnlyDriver:
    """The part of Triton's driver interface that compiling needs: a target, a device index and a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Triton keeps compiled kernels per device index: one index per arch, so no arch reuses another's.
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        raise AttributeError(f"compile-only driver: {name} would need a GPU")


def driver_launches() -> bool:
    """Whether Triton's active driver launches kernels: a real one (a ``DriverBase``, or none chosen yet, so the
    default), not a compile-only stand-in such as ``CompileOnlyDriver``. Creates no driver to tell."""
    active = getattr(triton_driver, "_active", None)
    return active is None or isinstance(active, DriverBase)


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[CompileOnlyDriver]:
    """``CompileOnlyDriver(arch)`` as Triton's active driver, the previous one restored on exit."""
    driver = CompileOnlyDriver(arch)
    # (Not reset_active(): without a GPU, Triton's default driver cannot be created. None is "not chosen yet".)
    previous = getattr(triton_driver, "_active", None)
    triton_driver.set_active(driver)
    try:
        yield driver
    finally:
        triton_driver.set_active(previous)


@contextlib.contextmanager
def launches_recorded(log: list) -> Iterator[None]:
    """Inside ``compile_only``: every launch compiles instead of running and is appended to ``log`` as
    ``(path, kernel, compiled, args, kwargs)``. ``path`` is ``"triton"`` for a launch through ``JITFunction.run``
    (``kernel`` the JIT function, ``kwargs`` its options) and ``"direct"`` for a compiled kernel's runner
    (``CompiledKernel[grid](*args)``, which the launchers of ``diffkern.triton._common.DirectLauncher`` then call:
    here it records and returns). For what can be checked and measured of the launch path without a GPU
    (tests/test_triton_direct_launch.py, ``bench --host``); restores everything on exit."""
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    original_run, original_getitem, original_launches = JITFunction.run, CompiledKernel.__getitem__, driver_launches

    def run(kernel, *args, grid, warmup, **kwargs):
        compiled = original_run(kernel, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            log.append(("triton", kernel, compiled, args, kwargs))
        return compiled

    def runner_of(compiled, grid):
        if len(grid) != 3:
            raise ValueError(f"a compiled kernel's runner takes a 3-D grid, got {grid}")

        def runner(*args, stream=None):
            log.append(("direct", None, compiled, args, None))
        return runner

    module = globals()
    JITFunction.run, CompiledKernel.__getitem__ = run, runner_of
    module["driver_launches"] = lambda: True  # the launchers go direct, as behind a real driver
    try:
        yield
    finally:
        JITFunction.run, CompiledKernel.__getitem__ = original_run, original_getitem
        module["driver_launches"] = original_launches
