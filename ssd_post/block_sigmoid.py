"""torch's CPU sigmoid bits for a few positions of a large block, without computing
the whole block.

torch's CPU sigmoid rounds differently in the vectorised body of its loop and in
the scalar tail (the last ``n % step`` elements of each thread's range, step = two
vectors: 16 floats with AVX2, 32 with AVX512), so the bits of ``sigmoid(x)[p]``
depend on where p sits in the tensor the call saw. torchvision calls sigmoid on a
whole (image, level) block; this module reproduces those bits for the positions
that can pass a threshold: the body positions through one vectorised call on a
gathered copy, the tail positions through scalar calls. When the loop layout is not
known (another CPU capability, a non-contiguous block) the caller computes the
block whole.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# at::internal::GRAIN_SIZE: elementwise CPU ops run on one thread below it.
_GRAIN_SIZE = 32768
_STEP = {"AVX2": 16, "AVX512": 32}
# Gathered values go through sigmoid in pieces that stay on one thread and fill
# whole steps, so every one of them takes the vectorised body.
_PIECE = 4096


def loop_step() -> Optional[int]:
    """Elements per iteration of torch's vectorised float loop on this CPU, or None."""
    return _STEP.get(torch.backends.cpu.get_cpu_capability())


def tail_mask(numel: int, positions: Tensor, step: int) -> Tensor:
    """Which ``positions`` (Tensor[N] int64) of a contiguous float block of ``numel``
    elements torch's elementwise loop computes in a scalar tail (Tensor[N] bool)."""
    threads = torch.get_num_threads()
    if numel < _GRAIN_SIZE or threads == 1:
        chunk = numel
    else:  # at::parallel_for: ceil(numel / threads) per thread, threads capped by the grain
        threads = min(threads, -(-numel // _GRAIN_SIZE))
        chunk = -(-numel // threads)
    offset = positions % chunk
    chunk_len = torch.clamp(numel - (positions - offset), max=chunk)
    return offset >= chunk_len - chunk_len % step


def sigmoid_gathered(values: Tensor, in_tail: Tensor, step: int) -> Tensor:
    """torch's sigmoid bits of ``values`` (Tensor[N] float32, gathered from blocks),
    each as torch computes it in the vectorised body of its loop or, where
    ``in_tail`` (Tensor[N] bool) is set, in the scalar tail."""
    out = torch.empty_like(values)
    if values.numel():
        padded = torch.cat((values, values.new_zeros((-values.numel()) % step)))
        out.copy_(
            torch.cat([torch.sigmoid(piece) for piece in padded.split(_PIECE)])[: values.numel()]
        )
        tail = in_tail.nonzero().flatten()
        # A call on fewer than ``step`` elements runs the scalar loop only.
        for piece in tail.split(step - 1):
            out[piece] = torch.sigmoid(values[piece])
    return out


def sigmoid_at(block: Tensor, positions: Tensor, step: int) -> Tensor:
    """``torch.sigmoid(block).flatten()[positions]`` to the bit (Tensor[N] float32).

    Args:
        block (Tensor[...] float32, contiguous): what torchvision calls sigmoid on.
        positions (Tensor[N] int64): flat positions in ``block``.
    """
    return sigmoid_gathered(
        block.flatten()[positions], tail_mask(block.numel(), positions, step), step
    )
