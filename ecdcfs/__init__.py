"""ecdcfs: Encodec ``.ecdc`` files as exact, seekable WAV files.

``ecdcfs.open(path_or_url)`` reads one as a binary file of WAV bytes without a mount (see
:mod:`ecdcfs.wavfile`). Importing ``ecdcfs`` is cheap: ``open`` imports the decoding
machinery when first called.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine
    from .settings import Settings
    from .wavfile import WavFile

__all__ = ["open", "version"]


def open(
    path_or_url: str | os.PathLike[str],
    *,
    engine: Engine | None = None,
    settings: Settings | None = None,
) -> WavFile:
    """An .ecdc file or http(s) URL as a read-only, seekable binary file (an
    :class:`io.RawIOBase`) of the WAV bytes a mount shows; see
    :func:`ecdcfs.wavfile.open_wav`."""
    from .wavfile import open_wav

    return open_wav(path_or_url, engine=engine, settings=settings)


def version() -> str:
    """The version of this package, from its installed metadata (set in pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("ecdcfs")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
