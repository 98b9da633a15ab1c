"""Loads the compiled kernels (the shared library ``ssd_post/_C*.so``) without
making them a condition of ``import ssd_post``.

The library holds torch op registrations only, no Python module (a C++ program can
load it too), so it is loaded with ``torch.ops.load_library``, not imported. The
pure-Python parts (DefaultBoxes, BoxCoder, the reference loop, the configs) work
without it; a missing, stale or ABI-mismatched build only fails at the first op
call, with the commands that rebuild it.
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import torch

REBUILD_HINT = (
    "Rebuild it against the installed torch from the source tree: "
    "`pip install --no-build-isolation -e .` (or `make install`, which also creates .venv/)."
)


def library_path() -> Optional[str]:
    """Path of the compiled op library inside the installed package, or None."""
    folder = os.path.dirname(os.path.abspath(__file__))
    found = sorted(
        glob.glob(os.path.join(folder, "_C.*so")) + glob.glob(os.path.join(folder, "_C.*pyd"))
    )
    return found[0] if found else None


def _load() -> Optional[BaseException]:
    path = library_path()
    if path is None:
        return ImportError(
            f"no compiled library _C.*.so in {os.path.dirname(os.path.abspath(__file__))}"
        )
    try:
        # Its static initialisers register the schemas and the CPU (and, when built
        # with nvcc, CUDA) kernels under torch.ops.ssd_post.
        torch.ops.load_library(path)
    except (
        OSError,
        RuntimeError,
    ) as error:  # not a library for this platform; undefined symbol (other torch)
        return error
    return None


LOAD_ERROR: Optional[BaseException] = _load()


def extension_loaded() -> bool:
    """Whether the op library loaded, i.e. the ``torch.ops.ssd_post`` ops exist."""
    return LOAD_ERROR is None


def require_extension() -> None:
    """Raises a RuntimeError naming the load failure and how to rebuild, when the
    compiled op library did not load."""
    if LOAD_ERROR is not None:
        raise RuntimeError(
            f"ssd_post's compiled extension (ssd_post._C) did not load: {LOAD_ERROR}. "
            f"{REBUILD_HINT}"
        ) from LOAD_ERROR
