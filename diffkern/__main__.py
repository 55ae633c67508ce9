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


COMMANDS = {
    "info": "versions, the device, and which backends are usable here and why",
    "demo": "the 2-D toy problem end to end on the CPU (trains, samples, writes a PNG)",
    "bench": "benchmark tables (time, GB/s, % of copy bandwidth, speedups); --help for its options",
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Each command parses its own options (so `bench --help` shows bench's), hence the dispatch on argv[0].
    if not argv or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(
            prog="python -m diffkern", formatter_class=argparse.RawDescriptionHelpFormatter,
            description="commands:\n" + "\n".join(f"  {name:<6} {text}" for name, text in COMMANDS.items()))
        parser.add_argument("command", choices=COMMANDS)
        parser.parse_args(argv)  # exits with usage (or help) since argv names no command
        return 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        argparse.ArgumentParser(prog="python -m diffkern info", description=COMMANDS["info"]).parse_args(rest)
        return info()
    if command == "demo":
        from diffkern import demo
        return demo.main(rest)
    from diffkern import bench
    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
