"""Shared pytest fixtures.

``torch_home`` provides seeded random-init Encodec checkpoints (see ``synth/``) so the
unmodified upstream loaders work offline. ``serve`` starts local HTTP servers of files
(``helpers.py``: also ``read_all`` and ``cuda_device_count``). ``media`` holds the files most
tests read, with their expected PCM and WAV bytes; ``src`` is an empty SOURCE folder.
``import synth`` in tests for ``make_ecdc``, ``to_v193`` and ``reference_pcm``.

Environment knobs:
  ECDCFS_TEST_NO_CACHE=1       generate checkpoints afresh instead of using
                               ~/.cache/ecdcfs-tests (or $XDG_CACHE_HOME/ecdcfs-tests);
                               also implied by CI (set to anything non-empty)
  ECDCFS_TEST_NO_DISK_CACHE=1  don't cache encoded files / reference PCM on disk
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import helpers
import synth
from ecdcfs.tree import SourceTree
from mounting import SR, TITLE, source_folder, wav_bytes


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every entry under ``folder``, by relative path ({} if missing)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in [folder, *folder.rglob("*")]
    }


@pytest.fixture(scope="session", autouse=True)
def _own_user_dirs(tmp_path_factory) -> Iterator[None]:
    """Every test (and every daemon it starts) gets cache and state dirs of its own:
    XDG_CACHE_HOME and XDG_STATE_HOME point into the session's temp dir. At the end, the
    user's own ``~/.cache/ecdcfs`` and ``~/.local/state/ecdcfs`` must be as they were."""
    from ecdcfs.settings import default_cache_dir, default_log_file

    theirs = [default_cache_dir(), default_log_file().parent]
    before = [_tree(folder) for folder in theirs]
    saved = {name: os.environ.get(name) for name in ("XDG_CACHE_HOME", "XDG_STATE_HOME")}
    for name in saved:
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    after = [_tree(folder) for folder in theirs]
    assert after == before, f"the tests changed the user's own {theirs}"


@pytest.fixture(scope="session")
def torch_home() -> Iterator[Path]:
    """Temp TORCH_HOME with the four Encodec checkpoints in ``hub/checkpoints``.

    Sets ``os.environ["TORCH_HOME"]`` for the whole session (daemons spawned by tests
    inherit it) and restores it afterwards.
    """
    home = Path(tempfile.mkdtemp(prefix="ecdcfs-torch-home-"))
    # CI runs hermetically: fresh checkpoints, nothing read from or written to ~/.cache.
    cache = not (os.environ.get("ECDCFS_TEST_NO_CACHE") or os.environ.get("CI"))
    old = os.environ.get("TORCH_HOME")
    try:
        synth.prepare_torch_home(home, cache)
        os.environ["TORCH_HOME"] = str(home)
        yield home
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def engine(torch_home, tmp_path):
    """A CPU decoding engine (the bit-exact reference device) persisting into tmp_path."""
    from ecdcfs.engine import Engine, Settings

    engine = Engine(Settings(device="cpu", exact=True, cache_dir=tmp_path / "cache"))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def graph_cache(torch_home, tmp_path_factory) -> Path:
    """A cache dir holding both models' decoder graphs, built once for the session."""
    from ecdcfs.container import MODELS
    from ecdcfs.graph_store import GraphStore

    cache = tmp_path_factory.mktemp("graph-cache")
    store = GraphStore(cache)
    for spec in MODELS.values():
        store.load(spec, lambda graph: graph)
    return cache


@pytest.fixture
def default_cache(graph_cache, tmp_path) -> Path:
    """A fresh cache dir that already holds the decoder graphs (hard links to graph_cache)."""
    cache = tmp_path / "default-cache"
    (cache / "graphs").mkdir(parents=True)
    for graph in (graph_cache / "graphs").iterdir():
        os.link(graph, cache / "graphs" / graph.name)
    return cache


@pytest.fixture(scope="session")
def media(torch_home) -> dict:
    """The 48 kHz files most tests read: ``song`` (2 s, 3 frames), ``song2`` (other audio),
    ``short`` (1 s, 2 frames), ``lm`` (1 s, LM-coded); each with its expected PCM
    (``*_pcm``, encodec's decode) and the WAV a mount serves (``*_wav``). ``short_v193`` is
    ``short`` at 44.1 kHz titled :data:`mounting.TITLE`; ``short_v192`` the same audio in
    other bytes."""
    made = {
        "song": synth.make_ecdc(samples=2 * SR, seed=11),
        "song2": synth.make_ecdc(samples=2 * SR, seed=14),
        "short": synth.make_ecdc(samples=SR, seed=12),
        "lm": synth.make_ecdc(samples=SR, lm=True, seed=13),
    }
    for name in list(made):
        made[f"{name}_pcm"] = synth.reference_pcm(made[name])
        made[f"{name}_wav"] = wav_bytes(made[f"{name}_pcm"], SR)
    made["short_v193"] = synth.to_v193(made["short"], sr=44_100, name=TITLE)
    made["short_v192"] = synth.to_v193(made["short"], sr=SR, version=192)
    return made


@pytest.fixture(scope="session")
def songs(torch_home, tmp_path_factory) -> dict[str, Path]:
    """.ecdc files in a folder: ``v0`` (:data:`helpers.SONG_SAMPLES` at 48 kHz), ``v193``
    (the same, tagged with :data:`helpers.SONG_TAGS`), ``v193_44k`` (titled, 44.1 kHz),
    ``v0_24k`` (3 s at 24 kHz) and ``lm`` (2 s LM-coded at 48 kHz)."""
    folder = tmp_path_factory.mktemp("songs")
    v0 = synth.make_ecdc("encodec_48khz", helpers.SONG_SAMPLES, kbps=6)
    name, source, thumbnail = helpers.SONG_TAGS
    made = {
        "v0": v0,
        "v193": synth.to_v193(v0, 48_000, name=name, source=source, thumbnail=thumbnail),
        "v193_44k": synth.to_v193(v0, 44_100, name=name),
        "v0_24k": synth.make_ecdc("encodec_24khz", 72_000, kbps=1.5),
        "lm": synth.make_ecdc("encodec_48khz", 2 * 48_000 + 1000, kbps=3, lm=True),
    }
    return {key: synth.write(folder, f"{key}.ecdc", data) for key, data in made.items()}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME of this test's own (where checkpoints are looked for)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """An empty SOURCE folder."""
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


@pytest.fixture
def tree(src: Path) -> Iterator[SourceTree]:
    """The view of ``src`` (no engine: it is created only if something decodes)."""
    view = SourceTree(src)
    yield view
    view.close()


@pytest.fixture
def small_library(tmp_path, media) -> Path:
    """A SOURCE of one 1 s file (``x.ecdc``, media["short"]) and a text file."""
    return source_folder(tmp_path, {"x.ecdc": media["short"], "a.txt": b"a"})


@pytest.fixture
def serve(monkeypatch):
    """``serve(files, ranges=True, lengths=True) -> (base URL, server)``; ``server.served``
    counts body bytes sent, ``server.requests`` requests; paths in ``server.short`` are sent
    cut short of their Content-Length."""
    for name in ("no_proxy", "NO_PROXY"):  # a proxy in the environment must not answer
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    servers = []

    def start(files: dict[str, bytes], ranges: bool = True, lengths: bool = True):
        server = helpers.FileServer(("127.0.0.1", 0), helpers.RangeHandler)
        server.files, server.ranges, server.lengths = files, ranges, lengths
        server.served, server.requests, server.short = 0, 0, set()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
