"""``python -m diffkern {info,demo,bench}``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import List, Optional


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"
    except Exception as exc:  # a broken install should not hide the rest of the report
        return f"fails to import ({type(exc).__name__}: {exc})"


def info() -> int:
    """Versions, the device, each backend's availability and why, and where the CUDA extension comes from."""
    import torch

    import diffkern
    from diffkern import backends

    print(f"diffkern   {diffkern.__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})")
    for module in ("triton", "diffusers"):
        print(f"{module:<10} {_version(module)}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device     cuda:0 {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB")
        device = "cuda"
    else:
        print("device     cpu (no CUDA device visible)")
        device = "cpu"
    print(f"\nbackends for {device} tensors (auto: {backends.ENV_VAR} if set, else "
          f"{'the first available of ' + '/'.join(backends.AUTO_PREFERENCE['add_noise']) if device == 'cuda' else 'reference'}):")
    for name, status in diffkern.available_backends(device).items():
        print(f"  {name:<10} {'yes' if status.available else 'no ':<4} {status.reason}")
    try:
        from diffkern import _extension
    except ImportError as exc:
        print(f"\nCUDA extension: not part of this install ({exc})")
        return 0
    status = _extension.status()
    print("\nCUDA extension:")
    for key, value in status.items():
        print(f"  {key:<18} {value}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m diffkern", description="diffkern command line")
    parser.add_argument("command", choices=("info", "demo", "bench"),
                        help="info: versions and backends; demo: the 2-D toy problem end to end on the CPU; "
                             "bench: benchmark tables")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"info takes no arguments, got {rest}")
        return info()
    if args.command == "demo":
        from diffkern import demo
        return demo.main(rest)
    from diffkern import bench
    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
