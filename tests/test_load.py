"""Many readers at once, for a while, through a real mount: threads and processes, the same
and different files, sequential and random reads; every byte right, the daemon alive and
its memory bounded."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import helpers
import synth
from mounting import SR, Mount, fuse_available

pytestmark = pytest.mark.mount

if not fuse_available():
    pytest.skip("needs /dev/fuse and fusermount", allow_module_level=True)

# A reader process, shared with scripts/bench --load.
LOAD_READER = Path(__file__).with_name("load_reader.py")


def test_many_readers_for_a_while(tmp_path, media):
    """Threads and processes, same and different files, sequential and random, through the
    page cache and O_DIRECT (every read reaches the daemon), for ~20 s: no error, no
    deadlock, identical bytes, memory bounded by the frame cache cap."""
    seconds = float(os.environ.get("ECDCFS_TEST_LOAD_SECONDS", "20"))
    cache_mb = 4  # about ten 48 kHz frames: readers evict each other's frames
    src = tmp_path / "src"
    src.mkdir()
    names = {"song.ecdc": "song", "short.ecdc": "short", "lm.ecdc": "lm"}
    (src / "other.ecdc").write_bytes(synth.to_v193(media["short"], sr=SR, version=192))
    for name, key in names.items():
        (src / name).write_bytes(media[key])
    expected = {
        "song.wav": media["song_wav"],
        "short.wav": media["short_wav"],
        "other.wav": media["short_wav"],
        "lm.wav": media["lm_wav"],
    }
    refs = tmp_path / "refs"
    refs.mkdir()
    for name, data in expected.items():
        (refs / name).write_bytes(data)
    m = Mount(src, tmp_path / "mnt", tmp_path / "log", "--cache-mb", str(cache_mb))
    try:
        pid = m.proc.pid
        # Baseline: the model and the LM loaded, once each file has been read (the files
        # are all 48 kHz: the daemon never loads the 24 kHz model).
        for name, data in expected.items():
            assert (m.mnt / name).read_bytes() == data
        assert "loaded encodec_48khz" in m.log_text()
        baseline_kib = helpers.proc_kib(pid, "VmRSS")
        assert helpers.reset_peak_rss(pid)
        errors: list[str] = []
        checked = [0]
        lock = threading.Lock()

        def thread_reader(
            seed: int, name: str, sequential: bool, shared: int | None, direct: bool = False
        ) -> None:
            rng = random.Random(seed)
            data = expected[name]
            flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)  # direct: every read to us
            fd = shared if shared is not None else os.open(m.mnt / name, flags)
            offset, total = 0, 0
            stop = time.monotonic() + seconds
            try:
                while time.monotonic() < stop:
                    if sequential:
                        length = 131072
                        offset = 0 if offset >= len(data) else offset
                    else:
                        offset = rng.randrange(len(data))
                        length = rng.choice([1, 3, 4096, 131072])
                    got = os.pread(fd, length, offset)
                    # (a read of the header ends where the PCM begins: a prefix)
                    if not got and offset < len(data) or got != data[offset : offset + len(got)]:
                        errors.append(f"{name}: wrong bytes at {offset}+{length}")
                        return
                    total += len(got)
                    offset += len(got)
            except OSError as exc:
                errors.append(f"{name}: {exc}")
            finally:
                if shared is None:
                    os.close(fd)
                with lock:
                    checked[0] += total

        shared = os.open(m.mnt / "song.wav", os.O_RDONLY)
        plan = [
            ("song.wav", True, None),
            ("song.wav", False, shared),
            ("song.wav", False, shared),
            ("song.wav", False, None, True),
            ("short.wav", False, None, True),
            ("other.wav", True, None, True),
            ("lm.wav", False, None),
        ]
        threads = [
            threading.Thread(target=thread_reader, args=(i, *p), daemon=True)
            for i, p in enumerate(plan)
        ]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(LOAD_READER),
                    str(m.mnt / name),
                    str(len(expected[name])),
                    str(seconds),
                    str(100 + i),
                    mode,
                    str(refs / name),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i, (name, mode) in enumerate(
                [("song.wav", "rand-direct"), ("lm.wav", "seq-direct"), ("other.wav", "rand")]
            )
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 120)
        assert not any(t.is_alive() for t in threads), "a reader is stuck (deadlock?)"
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 120)
            assert proc.returncode == 0, out
            proc_checked, _, _, proc_errors = out.split()
            assert proc_errors == "0", out  # each error is on the reader's stderr
            checked[0] += int(proc_checked)
        os.close(shared)
        assert not errors, errors[:5]
        assert checked[0] > 0
        growth = (helpers.proc_kib(pid, "VmHWM") - baseline_kib) * 1024
        # The frame cache cap, plus decoding's working memory and the readers' frames.
        assert growth < (cache_mb << 20) + (250 << 20), growth / 2**20
        assert m.proc.poll() is None
        assert "Traceback" not in m.log_text() and " ERROR " not in m.log_text()
        print(
            f"load: {len(threads)} threads + {len(procs)} processes, {seconds:g} s, "
            f"{checked[0] / 2**20:.1f} MiB checked, VmHWM - baseline {growth / 2**20:.0f} MiB"
        )
    finally:
        m.stop()
