"""Read-only: every write through the view and through a mount fails with EROFS, and the
source is untouched."""

from __future__ import annotations

import errno
import os

import pytest

import synth
from mounting import (
    Mount,
    mounts,
    source_folder,
)


@pytest.mark.parametrize(
    "flags",
    [
        os.O_WRONLY,
        os.O_RDWR,
        os.O_RDONLY | os.O_TRUNC,
        os.O_RDONLY | os.O_APPEND,
        os.O_WRONLY | os.O_CREAT,
    ],
)
def test_write_opens_fail_with_erofs(src, tree, flags):
    (src / "x.ecdc").write_bytes(synth.zero_codes())
    (src / "a.txt").write_text("a")
    for path in ("/x.wav", "/a.txt"):
        with pytest.raises(OSError) as info:
            tree.open(path, flags)
        assert info.value.errno == errno.EROFS


@mounts
def test_every_write_fails_with_erofs(tmp_path, media):
    src = source_folder(tmp_path, {"x.ecdc": media["short"], "a.txt": b"a"})
    (src / "d").mkdir()
    m = Mount(src, tmp_path / "mnt", tmp_path / "log")
    mnt = m.mnt
    attempts = {
        "create": lambda: os.open(mnt / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
        "trunc": lambda: os.open(mnt / "a.txt", os.O_RDONLY | os.O_TRUNC),
        "write": lambda: os.open(mnt / "x.wav", os.O_WRONLY),
        "append": lambda: os.open(mnt / "a.txt", os.O_WRONLY | os.O_APPEND),
        "unlink": lambda: os.unlink(mnt / "x.wav"),
        "rmdir": lambda: os.rmdir(mnt / "d"),
        "mkdir": lambda: os.mkdir(mnt / "e"),
        "rename": lambda: os.rename(mnt / "d", mnt / "e"),
        "link": lambda: os.link(mnt / "a.txt", mnt / "b.txt"),
        "symlink": lambda: os.symlink("a.txt", mnt / "l"),
        "mkfifo": lambda: os.mkfifo(mnt / "fifo"),
        "chmod": lambda: os.chmod(mnt / "x.wav", 0o777),
        "chown": lambda: os.chown(mnt / "a.txt", 1, 1),
        "utime": lambda: os.utime(mnt / "x.wav", (0, 0)),
        "truncate": lambda: os.truncate(mnt / "x.wav", 0),
        "setxattr": lambda: os.setxattr(mnt / "a.txt", "user.x", b"1"),
        "removexattr": lambda: os.removexattr(mnt / "a.txt", "user.x"),
    }
    try:
        for name, attempt in attempts.items():
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS, name
        assert not os.access(mnt / "x.wav", os.W_OK)
        assert sorted(os.listdir(src)) == ["a.txt", "d", "x.ecdc"]
        assert (src / "a.txt").read_text() == "a"
    finally:
        m.stop()
