"""How the view names SOURCE's entries (pure functions: no file system access).

Every regular file ``x.ecdc`` appears as ``x.wav``; everything else keeps its name:

* subfolders are mirrored (a *folder* named ``x.ecdc`` stays ``x.ecdc``);
* other regular files (cover art, playlists, text) pass through unchanged, read-only;
* symlinks are shown as symlinks with their target text unchanged and are never followed
  by ecdcfs itself: every path is resolved one component at a time with ``O_NOFOLLOW``,
  so no content from outside SOURCE is ever served (a symlink named ``x.ecdc`` is a
  symlink, not audio, so it is shown as ``x.ecdc``);
* FIFOs, sockets and device nodes are not shown;
* only the lowercase suffix ``.ecdc`` is converted, and a file named just ``.ecdc`` is not.

Name collisions (a real entry always keeps its own name): if ``x.ecdc`` sits next to a
real ``x.wav`` (file, folder or symlink), the decoded audio is shown as ``x.ecdc.wav``.
If that name is taken too (by a real ``x.ecdc.wav``, or by the audio of ``x.ecdc.ecdc``,
whose plain name it is), ``x.ecdc`` is shown unconverted under its own name. So every
source entry stays reachable under exactly one name, and lookups need a few ``lstat``
calls in one folder, never a listing.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator

ECDC_SUFFIX = ".ecdc"
WAV_SUFFIX = ".wav"
DIR, FILE, LINK, AUDIO = "dir", "file", "link", "audio"


def kind_of(mode: int) -> str | None:
    """How a source entry of this type is shown (None: hidden)."""
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISLNK(mode):
        return LINK
    return None


def is_ecdc_name(name: str) -> bool:
    """Whether ``name`` is converted: it ends in ``.ecdc`` and is more than that suffix."""
    return name.endswith(ECDC_SUFFIX) and len(name) > len(ECDC_SUFFIX)


def placement(
    name: str, exists: Callable[[str], bool], is_ecdc: Callable[[str], bool]
) -> str | None:
    """Name under which the regular file ``name`` (an ``.ecdc``) shows its audio.

    ``exists(n)``: a visible real entry ``n`` is in the folder; ``is_ecdc(n)``: ``n`` is a
    regular ``.ecdc`` file there. None: the file is shown unconverted (see module doc).
    """
    primary = name[: -len(ECDC_SUFFIX)] + WAV_SUFFIX
    if not exists(primary):
        return primary
    fallback = name + WAV_SUFFIX
    if not exists(fallback) and not is_ecdc(name + ECDC_SUFFIX):
        return fallback
    return None


def audio_candidates(name: str) -> Iterator[str]:
    """Source names whose audio could be shown as ``name``."""
    if name.endswith(WAV_SUFFIX) and len(name) > len(WAV_SUFFIX):
        stem = name[: -len(WAV_SUFFIX)]
        yield stem + ECDC_SUFFIX
        if is_ecdc_name(stem):
            yield stem


def list_names(kinds: dict[str, str]) -> dict[str, tuple[str, str]]:
    """The view of one folder: ``{shown name: (kind, source name)}``.

    ``kinds`` maps each visible source entry to its kind (:data:`DIR`, :data:`FILE`, ...).
    """

    def is_ecdc(name: str) -> bool:
        return is_ecdc_name(name) and kinds.get(name) == FILE

    shown: dict[str, tuple[str, str]] = {}
    for name, kind in kinds.items():
        target = placement(name, kinds.__contains__, is_ecdc) if is_ecdc(name) else None
        if target is None:
            shown[name] = (kind, name)
        else:
            shown[target] = (AUDIO, name)
    return shown
