"""scripts/bench counts and times the daemon's decodes from the daemon's own debug log:
the lines it parses (benchlib.daemon.decoded_units) must be the ones ecdcfs writes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import synth
from ecdcfs import cli, logs
from ecdcfs.engine import Engine, Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from benchlib.daemon import decoded_units  # noqa: E402


def test_every_decoded_frame_is_one_parsed_line_of_the_debug_log(torch_home, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.ecdc").write_bytes(synth.make_ecdc(samples=2 * 48_000, seed=11))
    log_file = tmp_path / "daemon.log"
    args = [str(src), str(tmp_path / "mnt"), "--log-level", "debug", "--log-file", str(log_file)]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    handler = logs.setup_logging(cli.parse_args(args))  # as the daemon logs
    try:
        engine = Engine(Settings(device="cpu", exact=True, cache_dir=None))
        audio = engine.open(src / "x.ecdc")
        audio.read(0, audio.size)  # decodes every frame once
        engine.close()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        handler.close()
    units = decoded_units(log_file.read_text())
    assert sorted(u.index for u in units) == list(range(audio.unit_count))
    assert {u.identity for u in units} == {audio.identity}
    assert all(u.seconds > 0 for u in units)  # a frame's decode takes milliseconds
