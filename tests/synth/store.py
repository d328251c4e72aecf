"""Where the generated checkpoints, and the files and PCM derived from them, are kept
between runs (``~/.cache/ecdcfs-tests`` or ``$XDG_CACHE_HOME/ecdcfs-tests``)."""

from __future__ import annotations

import os
from pathlib import Path

from synth.models import CHECKPOINT_FILES, generate_checkpoints, generator_key

GENERATION_ID_FILE = "ecdcfs-test-generation-id"


def checkpoint_dir(torch_home: str | os.PathLike | None = None) -> Path:
    """``$TORCH_HOME/hub/checkpoints``, asserting that our checkpoints are there."""
    if torch_home is None:
        torch_home = os.environ.get("TORCH_HOME")
        assert torch_home, (
            "TORCH_HOME is not set: use the `torch_home` pytest fixture (tests/conftest.py), "
            "which generates the random-init Encodec checkpoints and points TORCH_HOME at them"
        )
    d = Path(torch_home) / "hub" / "checkpoints"
    missing = [f for f in CHECKPOINT_FILES if not (d / f).is_file()]
    assert not missing, (
        f"missing Encodec checkpoints in {d}: {missing} (use the torch_home fixture)"
    )
    return d


def generation_id(torch_home: str | os.PathLike | None = None) -> str | None:
    """Random id written next to checkpoints we generated; ties derived caches to them."""
    p = checkpoint_dir(torch_home) / GENERATION_ID_FILE
    try:
        return p.read_text().strip() or None
    except OSError:
        return None


# Where generated checkpoints and files are cached between runs: decided on import, before
# conftest points XDG_CACHE_HOME at the session's temp dir (ecdcfs's own caches go there).
_CACHE_ROOT = (
    Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))
    / "ecdcfs-tests"
)


def default_cache_root() -> Path:
    return _CACHE_ROOT


def prepare_torch_home(torch_home: Path, cache: bool = True) -> Path:
    """Fill ``torch_home/hub/checkpoints`` with the generated checkpoints.

    With ``cache``, the checkpoints are generated once into
    ``<default_cache_root()>/checkpoints/<generator_key()>`` and hard-linked (or copied)
    from there; a cache entry is complete once its generation id file exists (it is
    built in a temp dir and renamed into place under a lock). Encoded files and
    reference PCM derived from a cached checkpoint set are cached on disk too, under
    ``derived/<generation id>``. Returns the checkpoint directory.
    """
    import fcntl
    import shutil
    import tempfile

    dest = torch_home / "hub" / "checkpoints"
    dest.mkdir(parents=True, exist_ok=True)
    if not cache:
        # No generation id: results derived from these checkpoints are cached in
        # memory only.
        generate_checkpoints(dest)
        return dest
    cache_root = default_cache_root() / "checkpoints"
    entry = cache_root / generator_key()
    if not (entry / GENERATION_ID_FILE).is_file():
        cache_root.mkdir(parents=True, exist_ok=True)
        with open(cache_root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (entry / GENERATION_ID_FILE).is_file():
                tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_root))
                generate_checkpoints(tmp)
                (tmp / GENERATION_ID_FILE).write_text(os.urandom(8).hex() + "\n")
                if entry.exists():
                    shutil.rmtree(entry)
                os.replace(tmp, entry)
                # Drop checkpoints of other generator versions (and half-written ones)
                # and whatever was derived from them.
                for other in cache_root.iterdir():
                    if other.is_dir() and other != entry:
                        shutil.rmtree(other, ignore_errors=True)
                gid = (entry / GENERATION_ID_FILE).read_text().strip()
                if _derived_root().is_dir():
                    for other in _derived_root().iterdir():
                        if other.name != gid:
                            shutil.rmtree(other, ignore_errors=True)
    for f in (*CHECKPOINT_FILES, GENERATION_ID_FILE):
        target = dest / f
        if target.exists():
            target.unlink()
        try:
            os.link(entry / f, target)
        except OSError:
            shutil.copyfile(entry / f, target)
    return dest


def _derived_root() -> Path:
    return default_cache_root() / "derived"


def _disk_cache_dir() -> Path | None:
    """Per-generation cache dir, only for cached checkpoint sets (see prepare_torch_home)."""
    gid = generation_id()
    if gid is None or os.environ.get("ECDCFS_TEST_NO_DISK_CACHE"):
        return None
    return _derived_root() / gid


def disk_get(name: str) -> bytes | None:
    d = _disk_cache_dir()
    if d is None:
        return None
    try:
        return (d / name).read_bytes()
    except OSError:
        return None


def disk_put(name: str, data: bytes) -> None:
    d = _disk_cache_dir()
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, d / name)
    except OSError:
        pass
