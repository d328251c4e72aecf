"""Entropy decoding of LM-coded files: encodec's language model on torch eager, with
ecdcfs's own CDF building and arithmetic-decoder pull (encodec's codes bit for bit).

The LM's probabilities depend on float details (even torch's thread count), so it runs
exactly as encodec's encoder ran it: on the CPU, eager, with torch's default threads.
torch and encodec (the ``ecdcfs[torch]`` extra) are imported only when an LM is loaded,
which the daemon leaves to a child process (:mod:`ecdcfs.lm_process`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from .checkpoint import LM_CHECKPOINTS, fetch
from .container import ContainerError, ModelSpec
from .decoder import LM_NEEDS_TORCH, ModelUnavailable
from .settings import torch_installed

# encodec's build_stable_quantized_cdf defaults, which its compress uses.
ROUNDOFF = 1e-8
MIN_RANGE = 2


def load_lm(spec: ModelSpec) -> Any:
    """encodec's language model of ``spec``'s model (its ``get_lm_model``), on the CPU.

    The checkpoint is fetched first (one clear line if it cannot be); the codec model it
    hangs from is built with random weights (only its sizes matter) and dropped.
    """
    if not torch_installed():
        raise ModelUnavailable(LM_NEEDS_TORCH)
    import torch

    from .torch_decoder import encodec_model

    path = fetch(LM_CHECKPOINTS[spec.name], f"{spec.name} LM")
    with torch.random.fork_rng(devices=[]):  # model init and get_lm_model reseed the RNG
        model = encodec_model(spec, pretrained=False)
        model.name = spec.name  # "unset" when not pretrained: get_lm_model picks by name
        try:
            return model.get_lm_model().cpu()
        except Exception as exc:  # torch.load's errors for a damaged file
            reason = " ".join(str(exc).split())  # one line, as every model error
            raise ModelUnavailable(
                f"cannot load {spec.name} LM from {path}: {reason} (a partial or damaged copy?)"
            ) from exc


def decode_lm_steps(
    lm: Any, stream: BinaryIO, num_codebooks: int, steps: int, block_steps: int
) -> Iterator[np.ndarray]:
    """Entropy-decode the ``steps`` code steps of one LM-coded frame from ``stream``.

    Yields the codes ``[codebooks, block_steps]`` of each block of steps in order (the last
    block may be shorter), so a long frame is usable before it is decoded to the end; the
    arithmetic decoder and the LM state carry over from block to block and start fresh
    for every frame, as encodec writes them. ``stream`` is left at the next frame.
    """
    import torch
    from encodec.quantization.ac import ArithmeticDecoder

    decoder = ArithmeticDecoder(stream)
    states: Any = None
    lm_offset = 0
    previous = torch.zeros(1, num_codebooks, 1, dtype=torch.long)
    for block_start in range(0, steps, block_steps):
        codes = np.zeros((num_codebooks, min(block_steps, steps - block_start)), dtype=np.int64)
        # Not across the yield: the mode is the thread's. Same kernels as no_grad, less
        # bookkeeping per op (3-10 % of the LM's time here).
        with torch.inference_mode():
            for t in range(codes.shape[1]):
                probas, states, lm_offset = lm(previous, states, lm_offset)
                cdfs = stable_quantized_cdfs(probas, decoder.total_range_bits)
                for k in range(num_codebooks):
                    codes[k, t] = pull_symbol(decoder, cdfs[k])
                previous = 1 + torch.from_numpy(codes[:, t : t + 1])[None]
        yield codes


def stable_quantized_cdfs(probas: Any, total_range_bits: int) -> np.ndarray:
    """encodec's ``build_stable_quantized_cdf`` of every codebook of one LM step at once.

    ``probas`` is the LM's output ``[1, card, codebooks, 1]``; returns int64
    ``[codebooks, card]``. The same float32 element-wise operations on the same scalars,
    then an integer cumsum, so every value is encodec's bit for bit (test_lm_decode checks
    this on real LM outputs); a quarter of the cost of one call per codebook at 16 or more.
    """
    pdf = probas[0, :, :, 0].T
    pdf = (pdf / ROUNDOFF).floor() * ROUNDOFF
    total_range = 2**total_range_bits
    alpha = MIN_RANGE * pdf.shape[-1] / total_range
    ranges = (((1 - alpha) * total_range) * pdf).floor().long() + MIN_RANGE
    return ranges.cumsum(dim=-1).numpy()


def pull_symbol(decoder: Any, cdf: np.ndarray) -> int:
    """``decoder.pull(cdf)`` for encodec's ``ArithmeticDecoder``, with one searchsorted for
    its recursive bisection (2-3x faster); raises :class:`ContainerError` where it fails.

    Symbol ``s`` owns ``[ceil(cdf[s-1] * r), floor((cdf[s] - 1) * r)]`` above ``low``, with
    ``r = delta / 2**bits``. encodec computes these bounds in doubles, exactly (24 bits:
    ``cdf <= 2**24`` and ``delta < 2**25``, products under 2**53), so integers give the
    same bounds. They are ordered and disjoint, so the first symbol whose range ends at or
    after the code is the one bisection finds; a code below that range's start lies between
    two ranges, in no symbol's (encodec's "Binary search failed").
    """
    bits = decoder.total_range_bits
    while decoder.delta < 1 << bits:  # widen the range bit by bit, as encodec's pull does
        bit = decoder.unpacker.pull()
        if bit is None:
            raise ContainerError("payload truncated inside an LM-coded frame")
        decoder.low *= 2
        decoder.high = decoder.high * 2 + 1
        decoder.current = decoder.current * 2 + bit
        decoder.max_bit += 1
    delta, code = decoder.delta, decoder.current - decoder.low
    # floor((cdf[s] - 1) * r) >= code  <=>  cdf[s] >= ceil(code * 2**bits / delta) + 1
    symbol = int(np.searchsorted(cdf, -(-(code << bits) // delta) + 1))
    start = -((-int(cdf[symbol - 1]) * delta) >> bits) if symbol else 0  # ceil
    if symbol == len(cdf) or start > code:
        raise ContainerError("corrupt LM payload: the code is in no symbol's range")
    end = ((int(cdf[symbol]) - 1) * delta) >> bits
    decoder.low, decoder.high = decoder.low + start, decoder.low + end
    decoder._flush_common_prefix()
    return symbol
