"""Hardening through real mounts: hostile folders, files changing under open handles,
signals, a missing device, mount(8) and fstab, permissions, and many readers at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import synth
from helpers import cuda_device_count
from mounting import (
    SR,
    Mount,
    daemon,
    daemon_pids,
    ecdcfs_cmd,
    fuse_available,
    is_mounted,
    pread_full,
    source_folder,
    unmount,
    wait_daemon_gone,
    wav_bytes,
    wav_size,
)

pytestmark = pytest.mark.mount

if not fuse_available():
    pytest.skip("needs /dev/fuse and fusermount", allow_module_level=True)

VENV_BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0


def _error_lines(mount: Mount) -> list[str]:
    return [line for line in mount.log_text().splitlines() if " ERROR " in line]


@pytest.fixture(scope="module")
def files(torch_home) -> dict:
    short = synth.make_ecdc(samples=SR, seed=12)
    song = synth.make_ecdc(samples=2 * SR, seed=11)
    song2 = synth.make_ecdc(samples=2 * SR, seed=14)
    lm = synth.make_ecdc(samples=SR, lm=True, seed=13)
    return {
        "short": short,
        "short_wav": wav_bytes(synth.reference_pcm(short), SR),
        "song": song,
        "song_wav": wav_bytes(synth.reference_pcm(song), SR),
        "song2": song2,
        "song2_wav": wav_bytes(synth.reference_pcm(song2), SR),
        "lm": lm,
        "lm_wav": wav_bytes(synth.reference_pcm(lm), SR),
    }


# ----- a hostile folder ---------------------------------------------------------------


def _header(meta, payload: bytes = b"", version: int = 0) -> bytes:
    body = json.dumps(meta).encode()
    return struct.pack("!4sBI", b"ECDC", version, len(body)) + body + payload


def test_hostile_folder(tmp_path, files):
    """Every kind of bad file at once: each fails alone, quickly, with one log line."""
    src = tmp_path / "src"
    src.mkdir()
    m48 = {"m": "encodec_48khz", "al": SR, "nc": 4, "lm": False}
    _, _, lm_offset = synth.parse_header(files["lm"])
    bad = {
        "empty.ecdc": b"",
        "magic.ecdc": b"RIFF" + files["short"][4:],
        "version.ecdc": files["short"][:4] + b"\x05" + files["short"][5:],
        "json.ecdc": struct.pack("!4sBI", b"ECDC", 0, 6) + b'{"m": ',
        "meta past end.ecdc": struct.pack("!4sBI", b"ECDC", 0, 5000) + b"{}",
        "meta 4 GiB.ecdc": struct.pack("!4sBI", b"ECDC", 0, 0xFFFFFFFF) + b"{}",
        "truncated.ecdc": files["song"][:-100],
        "al 1e12.ecdc": _header({**m48, "al": 10**12}, bytes(10_000)),
        "nc 0.ecdc": _header({**m48, "nc": 0}, bytes(10_000)),
        "nc 99.ecdc": _header({**m48, "nc": 99}, bytes(10_000)),
        "model.ecdc": _header({**m48, "m": "encodec_1khz"}, bytes(10_000)),
        "types.ecdc": _header({**m48, "al": "48000", "lm": "yes"}, bytes(10_000)),
        # Two hours claimed, 100 bytes of payload: indexing fails within the first block.
        "lm 24k 2h.ecdc": _header(
            {"m": "encodec_24khz", "al": 7200 * 24_000, "nc": 4, "lm": True}, bytes(100)
        ),
    }
    for name, data in bad.items():
        (src / name).write_bytes(data)
    # Random bytes after a valid LM header: decodes to some audio or fails, never hangs.
    garbage = files["lm"][:lm_offset] + random.Random(0).randbytes(len(files["lm"]) - lm_offset)
    (src / "garbage lm.ecdc").write_bytes(garbage)
    (src / "folder.ecdc").mkdir()
    (src / "folder.ecdc" / "inner.ecdc").write_bytes(files["short"])
    (src / "good [1] ☃.ecdc").write_bytes(files["short"])
    with open(os.fsencode(src) + b"/bad \xff name.ecdc", "wb") as f:
        f.write(b"not audio")
    (src / "x.ecdc").write_bytes(files["short"])
    (src / "x.wav").write_bytes(b"a real wav")
    m = Mount(src, tmp_path / "mnt", tmp_path / "log")
    try:
        listing = set(os.listdir(m.mnt))
        expected = {n[:-5] + ".wav" for n in bad} | {
            "garbage lm.wav",
            "folder.ecdc",
            "good [1] ☃.wav",
            "bad \udcff name.wav",
            "x.wav",
            "x.ecdc.wav",
        }
        assert listing == expected
        for name in [n[:-5] + ".wav" for n in bad] + ["bad \udcff name.wav"]:
            path = m.mnt / name
            size = os.stat(path).st_size
            assert size == (wav_size(7200 * 24_000 * 2) if name.startswith("lm 24k") else 0), name
            started = time.monotonic()
            done = subprocess.run(["cat", str(path)], capture_output=True, timeout=60)
            assert done.returncode != 0 and b"Input/output error" in done.stderr, name
            # (The LM-coded file loads the 24 kHz model and its LM first.)
            assert time.monotonic() - started < (30 if name.startswith("lm 24k") else 5), name
        # The garbage LM file: a full-length read, or EIO; in bounded time.
        started = time.monotonic()
        try:
            data = (m.mnt / "garbage lm.wav").read_bytes()
            assert len(data) == len(files["lm_wav"])
        except OSError as exc:
            assert exc.errno == errno.EIO
        assert time.monotonic() - started < 60
        # The rest of the mount is unaffected.
        assert (m.mnt / "good [1] ☃.wav").read_bytes() == files["short_wav"]
        assert (m.mnt / "folder.ecdc" / "inner.wav").read_bytes() == files["short_wav"]
        assert (m.mnt / "x.wav").read_bytes() == b"a real wav"
        assert (m.mnt / "x.ecdc.wav").read_bytes() == files["short_wav"]
        log = m.log_text()
        for name in [*bad, "bad \\xff name.ecdc"]:  # a name's bytes escaped in the log
            lines = [line for line in _error_lines(m) if f"/{name}: " in line]
            assert len(lines) == 1, (name, _error_lines(m))
        assert "Traceback" not in log
        assert m.proc.poll() is None
    finally:
        m.stop()


# ----- files changing under the mount -------------------------------------------------


def test_source_replaced_truncated_or_deleted_while_open(tmp_path, files):
    """An open handle keeps reading its version; new opens see the new one; never mixed."""
    src = source_folder(tmp_path, {"x.ecdc": files["song"]})
    target = src / "x.ecdc"
    m = Mount(src, tmp_path / "mnt", tmp_path / "log")
    path = m.mnt / "x.wav"
    old, new, short = files["song_wav"], files["song2_wav"], files["short_wav"]
    assert len(old) == len(new) and old != new

    def read_all(fd: int, size: int) -> bytes:
        return pread_full(fd, size, 0)

    def replace(data: bytes) -> None:
        (src / "tmp").write_bytes(data)
        os.replace(src / "tmp", target)

    try:
        first = os.open(path, os.O_RDONLY)
        assert pread_full(first, 100_000, 0) == old[:100_000]
        replace(files["song2"])  # same length, other audio
        time.sleep(1.1)  # past the attribute timeout: the kernel asks again
        second = os.open(path, os.O_RDONLY)
        assert read_all(second, len(new)) == new
        assert read_all(first, len(old)) == old  # its own version, whole
        assert os.fstat(first).st_size == len(old)
        # A shorter version while both are open: each handle still reads its own bytes
        # (the kernel keeps one size per name, so an older handle may see its end early).
        replace(files["short"])
        third = os.open(path, os.O_RDONLY)
        assert read_all(third, len(short)) == short
        for fd, data in ((first, old), (second, new)):
            got = read_all(fd, len(data))
            assert got == data[: len(got)] and len(got) >= len(short)
        # Deleted: open handles keep their snapshots; the name is gone.
        target.unlink()
        assert read_all(third, len(short)) == short
        time.sleep(1.1)
        assert not path.exists()
        assert read_all(third, len(short)) == short  # after the name is gone, too
        for fd in (first, second, third):
            os.close(fd)
        # Truncated while open, then while mounted: lists with size 0, fails with EIO.
        target.write_bytes(files["short"])
        fd = os.open(path, os.O_RDONLY)
        with open(target, "r+b") as f:
            f.truncate(len(files["short"]) // 2)
        assert read_all(fd, len(short)) == short  # the snapshot taken at open
        os.close(fd)
        time.sleep(1.1)
        assert os.stat(path).st_size == 0
        with pytest.raises(OSError) as info:
            path.read_bytes()
        assert info.value.errno == errno.EIO
        target.write_bytes(files["short"])  # repaired in place
        time.sleep(1.1)
        assert path.read_bytes() == short
        assert "Traceback" not in m.log_text()
    finally:
        m.stop()


# ----- signals ------------------------------------------------------------------------


def test_sigterm_to_the_daemon_unmounts_and_logs(tmp_path, files):
    src = source_folder(tmp_path, {"x.ecdc": files["short"]})
    mnt = tmp_path / "mnt"
    log = tmp_path / "daemon.log"
    with daemon(src, mnt, log, "--device", "cpu"):
        fd = os.open(mnt / "x.wav", os.O_RDONLY)  # an open handle does not block it
        os.pread(fd, 4096, 0)
        (pid,) = daemon_pids(mnt)
        os.kill(pid, signal.SIGTERM)
        wait_daemon_gone(mnt)
        assert not daemon_pids(mnt)
        with pytest.raises(OSError):  # not cached by the kernel: fails, does not hang
            os.pread(fd, 4096, 150_000)
        with contextlib.suppress(OSError):  # ENOTCONN from the flush; the fd is closed
            os.close(fd)
        # The kernel may keep the mount while a handle was open (then -u clears it).
        if is_mounted(mnt):
            done = subprocess.run(ecdcfs_cmd("-u", str(mnt)), capture_output=True, timeout=60)
            assert done.returncode == 0
        assert not is_mounted(mnt)
        assert "unmounted" in log.read_text() or "serving" in log.read_text()


# ----- where the reasons go -----------------------------------------------------------


def test_a_daemon_without_syslog_logs_to_the_state_dir(tmp_path, files):
    """No --log-file, no syslog listening (containers, WSL): $XDG_STATE_HOME/ecdcfs/."""
    src = source_folder(tmp_path, {"x.ecdc": files["short"], "bad.ecdc": b"not ECDC"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "state" / "ecdcfs" / "ecdcfs.log"
    # The daemon's command with syslog pointed at a path where none listens.
    code = "import sys; from ecdcfs import cli, logs; logs.SYSLOG_SOCKET = sys.argv[1]; "
    code += "sys.exit(cli.main(sys.argv[2:]))"
    no_syslog = str(tmp_path / "no-syslog")
    try:
        started = subprocess.run(
            [sys.executable, "-c", code, no_syslog, str(src), str(mnt), "--no-persist", "--exact"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
        )
        assert started.returncode == 0, started.stderr
        assert started.stderr == f"ecdcfs: no syslog ({no_syslog}): the daemon logs to {log}\n"
        assert (mnt / "x.wav").read_bytes() == files["short_wav"]
        with pytest.raises(OSError):
            (mnt / "bad.wav").read_bytes()
        unmount(mnt)
        wait_daemon_gone(mnt)
        text = log.read_text()
        assert f"serving {src} on {mnt}" in text and f"unmounted {mnt}" in text
        assert f"cannot open {src}/bad.ecdc: " in text
    finally:
        unmount(mnt)
        for pid in daemon_pids(mnt):
            os.kill(pid, signal.SIGKILL)


def test_reasons_in_an_xattr_and_a_checkpoint_copied_in_while_mounted(
    tmp_path, files, torch_home, monkeypatch
):
    """getfattr shows why a file cannot be read; a missing checkpoint copied in while
    mounted is used at the next read, and the reason goes away."""
    src = source_folder(tmp_path, {"x.ecdc": files["short"], "bad.ecdc": b"not", "a.txt": b"a"})
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("http_proxy", "https_proxy"):  # offline: downloads fail at once
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    m = Mount(src, tmp_path / "mnt", tmp_path / "log")
    x, name = m.mnt / "x.wav", "user.ecdcfs.error"
    try:
        for path in (x, m.mnt / "a.txt", m.mnt):  # nothing known against them
            assert os.listxattr(path) == (["user.ecdcfs.stats"] if path == m.mnt else [])
            with pytest.raises(OSError) as info:
                os.getxattr(path, name)
            assert info.value.errno == errno.ENODATA
        assert os.listxattr(m.mnt / "bad.wav") == [name]
        bad_reason = b"file too short for an ECDC header (3 bytes)"
        assert os.getxattr(m.mnt / "bad.wav", name) == bad_reason
        for _ in range(2):
            with pytest.raises(OSError) as info:
                x.read_bytes()
            assert info.value.errno == errno.EIO
        reason = os.getxattr(x, name).decode()
        assert reason.startswith("encodec_48khz checkpoint encodec_48khz-7e698e3e.th is missing")
        assert "https://dl.fbaipublicfiles.com/encodec/v0/encodec_48khz-7e698e3e.th" in reason
        assert str(checkpoints) in reason and os.listxattr(x) == [name]
        shutil.copy(synth.checkpoint_dir(torch_home) / "encodec_48khz-7e698e3e.th", checkpoints)
        assert os.listxattr(x) == []
        assert x.read_bytes() == files["short_wav"]  # no remount
        assert os.listxattr(x) == []
        log = m.log_text()
        assert len(_error_lines(m)) == 1, _error_lines(m)  # bad.ecdc was never opened
        assert "encodec_48khz loaded: its checkpoint encodec_48khz-7e698e3e.th was found" in log
        assert "Traceback" not in log
    finally:
        m.stop()


# ----- model load failures ------------------------------------------------------------


def test_a_gpu_that_is_not_here_is_refused_at_mount(tmp_path, files):
    """Not at the first read: the mount is never made and nothing keeps running."""
    src = source_folder(tmp_path, {"x.ecdc": files["short"]})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "log"
    device = f"cuda:{cuda_device_count()}"  # one past the last (cuda:0 without CUDA)
    try:
        for mode in ("-f", "--no-persist"):  # foreground, and a daemon
            done = subprocess.run(
                ecdcfs_cmd(str(src), str(mnt), mode, "-o", f"device={device},log_file={log}"),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 2, done.stderr
            assert done.stderr.count("\n") == 1 and f"--device {device}: " in done.stderr
            assert not is_mounted(mnt) and not daemon_pids(mnt)
    finally:
        unmount(mnt)


def test_mounting_over_a_live_mount_is_refused(tmp_path, files):
    """libfuse's advice (-o nonempty) would stack a second daemon: ecdcfs refuses."""
    src = source_folder(tmp_path, {"x.ecdc": files["short"]})
    mnt = tmp_path / "mnt"
    with daemon(src, mnt, tmp_path / "log", "--device", "cpu"):
        pids = daemon_pids(mnt)
        for extra in ((), ("-o", "nonempty"), ("-f",)):
            done = subprocess.run(
                ecdcfs_cmd(str(src), str(mnt), "--no-persist", "--device", "cpu", *extra),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 2, done.stderr
            assert done.stderr.count("\n") == 1, done.stderr
            assert "is already mounted (fuse.ecdcfs)" in done.stderr
        assert daemon_pids(mnt) == pids
        assert (mnt / "x.wav").read_bytes() == files["short_wav"]
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        assert sum(line.split(" ")[4] == str(mnt) for line in mountinfo) == 1


# ----- mount(8), fstab ----------------------------------------------------------------

needs_mount_helper = pytest.mark.skipif(
    not IS_ROOT or not shutil.which("mount.fuse3", path="/sbin:/usr/sbin"),
    reason="needs root and mount.fuse3 (fuse3)",
)


@needs_mount_helper
def test_mount_type_fuse_ecdcfs_and_fstab(tmp_path, files):
    """``mount -t fuse.ecdcfs``, the ``fuse`` + ``PROGRAM#SOURCE`` form, and fstab lines."""
    src = source_folder(tmp_path, {"x.ecdc": files["short"]})
    log = tmp_path / "log"
    opts = f"device=cpu,exact,no_persist,log_file={log},cache_mb=64"
    program = VENV_BIN / "ecdcfs"
    mounts = [tmp_path / f"mnt{i}" for i in range(4)]
    for mnt in mounts:
        mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{src} {mounts[2]} fuse.ecdcfs noauto,{opts},_netdev,nofail,x-systemd.automount 0 0\n"
        f"{program}#{src} {mounts[3]} fuse noauto,user,{opts} 0 0\n"
    )
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    on_default_path = shutil.which(
        "ecdcfs", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )
    try:
        # What mount -t fuse.ecdcfs runs: mount.fuse3 SOURCE MNT -o OPTS -t fuse.ecdcfs, which
        # starts "ecdcfs" from PATH (mount(8) itself resets PATH to the default one).
        helper = shutil.which("mount.fuse3", path="/sbin:/usr/sbin")
        done = subprocess.run(
            [helper, str(src), str(mounts[0]), "-o", f"rw,{opts},dev,suid", "-t", "fuse.ecdcfs"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        # mount(8) with type fuse and the program named in full.
        done = subprocess.run(
            ["mount", "-t", "fuse", f"{program}#{src}", str(mounts[1]), "-o", opts],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        # fstab lines (an alternative fstab file: mount -T).
        for mnt in mounts[2:] if on_default_path else mounts[3:]:
            done = subprocess.run(
                ["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
        for mnt in mounts if on_default_path else [mounts[0], mounts[1], mounts[3]]:
            assert is_mounted(mnt), mnt
            assert (mnt / "x.wav").read_bytes() == files["short_wav"]
            mounts_text = Path("/proc/mounts").read_text()
            fields = [line.split() for line in mounts_text.splitlines() if f" {mnt} " in line][0]
            assert fields[2] == "fuse.ecdcfs" and fields[3].startswith("ro"), fields
    finally:
        for mnt in mounts:
            unmount(mnt)
            wait_daemon_gone(mnt)
    assert "Traceback" not in log.read_text()


# ----- permissions and symlinks -------------------------------------------------------


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    done = subprocess.run(list(cmd), capture_output=True, timeout=60, preexec_fn=drop)
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout, done.stderr.decode(errors="replace")
    )


@pytest.fixture
def public_tmp() -> Path:
    """A folder every user can traverse (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="ecdcfs-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_allow_other_enforces_the_source_permissions(public_tmp, files):
    tmp_path = public_tmp
    src = tmp_path / "src"
    src.mkdir(mode=0o755)
    for name, mode in [("public.ecdc", 0o644), ("private.ecdc", 0o600)]:
        (src / name).write_bytes(files["short"])
        os.chmod(src / name, mode)
    (src / "secret").mkdir(mode=0o700)
    (src / "secret" / "s.ecdc").write_bytes(files["short"])
    (src / "notes.txt").write_text("hello")
    os.chmod(src / "notes.txt", 0o640)
    mnt = tmp_path / "mnt"
    mnt.mkdir(mode=0o755)
    m = Mount(src, mnt, tmp_path / "log", "--allow-other")
    try:
        assert stat.S_IMODE(os.stat(mnt / "private.wav").st_mode) == 0o400
        assert stat.S_IMODE(os.stat(mnt / "public.wav").st_mode) == 0o444
        ok = _as_nobody("cat", str(mnt / "public.wav"))
        assert ok.returncode == 0 and ok.stdout == files["short_wav"]
        for path in ("private.wav", "notes.txt", "secret/s.wav"):
            denied = _as_nobody("cat", str(mnt / path))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, path
        denied = _as_nobody("ls", str(mnt / "secret"))
        assert "Permission denied" in denied.stderr
        assert (mnt / "private.wav").read_bytes() == files["short_wav"]  # the owner reads
    finally:
        m.stop()
    # Without allow_other, other users cannot even look.
    m = Mount(src, mnt, tmp_path / "log2")
    try:
        assert "Permission denied" in _as_nobody("ls", str(mnt)).stderr
    finally:
        m.stop()


def test_symlinks_to_the_mount_point_are_not_followed_by_the_daemon(tmp_path, files):
    src = source_folder(tmp_path, {"x.ecdc": files["short"]})
    mnt = tmp_path / "mnt"
    os.symlink(mnt, src / "loop")  # SOURCE/loop -> MOUNTPOINT
    os.symlink(mnt / "x.wav", src / "y.ecdc")
    os.symlink("..", src / "up")
    m = Mount(src, mnt, tmp_path / "log")
    try:
        assert os.readlink(mnt / "loop") == str(mnt)
        assert os.readlink(mnt / "y.ecdc") == str(mnt / "x.wav")
        # Programs may follow them (the kernel does, back into the mount): no deadlock.
        done = subprocess.run(
            ["ls", "-lR", str(mnt)], capture_output=True, text=True, timeout=30
        )  # does not follow symlinks
        assert done.returncode == 0
        assert sorted(os.listdir(mnt / "loop")) == ["loop", "up", "x.wav", "y.ecdc"]
        assert (mnt / "loop" / "loop" / "x.wav").read_bytes() == files["short_wav"]
        assert (mnt / "y.ecdc").read_bytes() == files["short_wav"]
        done = subprocess.run(
            ["find", "-L", str(mnt), "-maxdepth", "4"], capture_output=True, timeout=60
        )
        assert b"x.wav" in done.stdout
    finally:
        m.stop()


def test_every_write_fails_with_erofs(tmp_path, files):
    src = source_folder(tmp_path, {"x.ecdc": files["short"], "a.txt": b"a"})
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


# ----- load ---------------------------------------------------------------------------

# A reader process, shared with scripts/bench --load.
LOAD_READER = Path(__file__).with_name("load_reader.py")


def test_many_readers_for_a_while(tmp_path, files):
    """Threads and processes, same and different files, sequential and random, through the
    page cache and O_DIRECT (every read reaches the daemon), for ~20 s: no error, no
    deadlock, identical bytes, memory bounded by the frame cache cap."""
    seconds = float(os.environ.get("ECDCFS_TEST_LOAD_SECONDS", "20"))
    cache_mb = 4  # about ten 48 kHz frames: readers evict each other's frames
    src = tmp_path / "src"
    src.mkdir()
    names = {"song.ecdc": "song", "short.ecdc": "short", "lm.ecdc": "lm"}
    (src / "other.ecdc").write_bytes(synth.to_v193(files["short"], sr=SR, version=192))
    for name, key in names.items():
        (src / name).write_bytes(files[key])
    expected = {
        "song.wav": files["song_wav"],
        "short.wav": files["short_wav"],
        "other.wav": files["short_wav"],
        "lm.wav": files["lm_wav"],
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
        baseline_kib = synth.proc_kib(pid, "VmRSS")
        assert synth.reset_peak_rss(pid)
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
        growth = (synth.proc_kib(pid, "VmHWM") - baseline_kib) * 1024
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
