"""Synthetic Encodec checkpoints and .ecdc test files.

The pretrained Encodec checkpoints cannot be downloaded in the test environment, so we
build seeded random-init models with exactly the upstream architecture and save them under
the file names encodec looks for in ``$TORCH_HOME/hub/checkpoints``.
``torch.hub.load_state_dict_from_url`` uses a present file without downloading it (the
hash in the file name is only checked on download), so the unmodified upstream code
(``EncodecModel.encodec_model_48khz()``, ``get_lm_model()``, ``encodec.compress``) then
runs against our random models.

- :mod:`synth.audio`: deterministic test audio.
- :mod:`synth.models`: the random-init models and LMs (why they are initialised as they
  are), written as checkpoints.
- :mod:`synth.store`: where checkpoints, encoded files and reference PCM are kept between
  runs.
- :mod:`synth.encode`: .ecdc files encoded with ``encodec.compress``, LM-coded frames of
  chosen codes.
- :mod:`synth.container`: the container, written from the format.
- :mod:`synth.reference`: the expected PCM, from encodec's own decode.

The container code, the PCM conversion and the reference decodes deliberately import
nothing from ecdcfs: they are an independent oracle that the filesystem's own
``ecdcfs.container`` and decoders are checked against.

Use (tests need the ``torch_home`` fixture from conftest.py)::

    import synth

    def test_something(torch_home):
        v0 = synth.make_ecdc("encodec_48khz", 5 * 48_000, kbps=6, lm=False, seed=0)
        v193 = synth.to_v193(v0, 48_000, name="Song", source="https://example.invalid/")
        pcm = synth.reference_pcm(v0)  # int16 [samples, channels], exact expected output
"""

from synth.audio import model_params, synth_audio
from synth.container import (
    container_24khz,
    container_bytes,
    long_plain_file,
    parse_header,
    random_packed_24khz,
    to_v0,
    to_v193,
    zero_codes,
)
from synth.encode import MODEL_LOCK, encode_uncached, lm_encode, load_model, make_ecdc, write
from synth.models import CHECKPOINT_FILES
from synth.reference import decodes_upstream, decompress_fixed, float_to_pcm16, reference_pcm
from synth.store import checkpoint_dir, prepare_torch_home

__all__ = [
    "CHECKPOINT_FILES",
    "MODEL_LOCK",
    "checkpoint_dir",
    "container_24khz",
    "container_bytes",
    "decodes_upstream",
    "decompress_fixed",
    "encode_uncached",
    "float_to_pcm16",
    "lm_encode",
    "load_model",
    "long_plain_file",
    "make_ecdc",
    "model_params",
    "parse_header",
    "prepare_torch_home",
    "random_packed_24khz",
    "reference_pcm",
    "synth_audio",
    "to_v0",
    "to_v193",
    "write",
    "zero_codes",
]
