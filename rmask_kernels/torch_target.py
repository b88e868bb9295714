"""The oldest torch this package runs with.

The extension (rmask_kernels._C) reaches torch only through LibTorch's stable ABI, compiled with
TORCH_TARGET_VERSION set to this release (setup.py and CMakeLists.txt read the value here), so it
loads in this torch and every later one. Older torches lack parts of that ABI: the package
refuses them at import with an error naming both versions, rather than fail later on an
undefined symbol.
"""

from __future__ import annotations

import re

TORCH_TARGET = (2, 11)


def torch_release(version: str) -> tuple:
    """'2.14.1+cu130' -> (2, 14); '2.11.0a0+git1234' -> (2, 11)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"torch version must start with MAJOR.MINOR, got {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(version: str) -> None:
    """Raise ImportError if torch ``version`` is older than TORCH_TARGET."""
    if torch_release(version) < TORCH_TARGET:
        from . import __version__

        target = "%d.%d" % TORCH_TARGET
        raise ImportError(
            f"rmask_kernels {__version__} needs torch >= {target} (its extension is built on LibTorch's "
            f"stable ABI of torch {target}), but this process runs torch {version}: "
            f"install torch>={target}"
        )
