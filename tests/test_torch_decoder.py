"""encodec's own decode on torch (:class:`ecdcfs.torch_decoder.TorchDecoder`): what it does to the
process beyond decoding."""

from __future__ import annotations

import subprocess
import sys


def test_warming_torchs_vector_math_keeps_elus_samples_bit_for_bit():
    """The warm-up that keeps torch's ELU fast (see ``torch_decoder.warm_vector_math``), in a fresh
    process that has not run it yet: ELU's samples are the same before and after."""
    script = (
        "import torch\n"
        "from ecdcfs.torch_decoder import warm_vector_math\n"
        "x = torch.randn(4, 100_000, generator=torch.Generator().manual_seed(0)) * 30\n"
        "before = torch.nn.functional.elu(x)\n"
        "warm_vector_math()\n"
        "assert torch.equal(before, torch.nn.functional.elu(x))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
