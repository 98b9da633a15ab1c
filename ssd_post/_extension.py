"""Loads the compiled kernels (``ssd_post._C``) without making them a condition of
``import ssd_post``.

The pure-Python parts (DefaultBoxes, BoxCoder, the reference loop, the configs) work
without the extension; a missing, stale or ABI-mismatched build only fails at the
first op call, with the commands that rebuild it.
"""
from __future__ import annotations

from typing import Optional

LOAD_ERROR: Optional[BaseException]
try:
    # Its static initialisers register the schemas and the CPU (and, when built
    # with nvcc, CUDA) kernels under torch.ops.ssd_post.
    from . import _C  # noqa: F401
    LOAD_ERROR = None
except (ImportError, OSError) as error:  # absent; undefined symbol (other torch); wrong ELF
    LOAD_ERROR = error

REBUILD_HINT = (
    "Rebuild it against the installed torch from the source tree: "
    "`pip install --no-build-isolation -e .` (or `make install`, which also creates .venv/).")


def extension_loaded() -> bool:
    """Whether ``ssd_post._C`` loaded, i.e. the ``torch.ops.ssd_post`` ops exist."""
    return LOAD_ERROR is None


def require_extension() -> None:
    """Raises a RuntimeError naming the load failure and how to rebuild, when the
    compiled extension did not load."""
    if LOAD_ERROR is not None:
        raise RuntimeError(
            f"ssd_post's compiled extension (ssd_post._C) did not load: {LOAD_ERROR}. "
            f"{REBUILD_HINT}") from LOAD_ERROR
