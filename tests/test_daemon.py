"""The mount's life: daemon and foreground mounts, unmounting by command and by signal,
mount(8) and fstab, its log, devices it cannot use, permissions, symlinks, and many
readers at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import synth
from ecdcfs.decoder import ModelUnavailable
from ecdcfs.engine import Engine, Settings
from helpers import cuda_device_count
from mounting import (
    SR,
    Mount,
    daemon,
    daemon_pids,
    ecdcfs_cmd,
    fuse_available,
    is_mounted,
    source_folder,
    unmount,
    wait_daemon_gone,
    wav_bytes,
)

pytestmark = pytest.mark.mount

if not fuse_available():
    pytest.skip("needs /dev/fuse and fusermount", allow_module_level=True)

VENV_BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0
needs_mount_helper = pytest.mark.skipif(
    not IS_ROOT or not shutil.which("mount.fuse3", path="/sbin:/usr/sbin"),
    reason="needs root and mount.fuse3 (fuse3)",
)


# ----- starting and stopping --------------------------------------------------


def test_daemon_mode_and_unmount(small_library, tmp_path, media):
    mnt = tmp_path / "mnt"
    log = tmp_path / "daemon.log"
    with daemon(small_library, mnt, log, "-o", "device=cpu,cache_mb=64,bufsize=2"):
        assert os.path.ismount(mnt)  # mounted by the time the command returns
        pids = daemon_pids(mnt)
        assert len(pids) == 1
        assert (mnt / "x.wav").read_bytes() == wav_bytes(media["short_pcm"], SR)
        os.symlink(tmp_path, tmp_path / "link")  # unmount through a symlinked parent
        done = subprocess.run(
            ecdcfs_cmd("-u", str(tmp_path / "link" / "mnt")),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mnt)
        wait_daemon_gone(mnt)
        assert not daemon_pids(mnt), "the daemon did not exit after unmount"
        text = log.read_text()
        assert "serving" in text and "unmounted" in text and "loaded encodec_48khz" in text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_a_foreground_mount_cleanly(small_library, tmp_path, signum):
    m = Mount(small_library, tmp_path / "mnt", tmp_path / "log")
    try:
        assert (m.mnt / "a.txt").read_text() == "a"
        m.proc.send_signal(signum)
        assert m.proc.wait(timeout=30) == 0
        assert not is_mounted(m.mnt)
    finally:
        m.stop()


def test_sigterm_to_the_daemon_unmounts_and_logs(tmp_path, media):
    src = source_folder(tmp_path, {"x.ecdc": media["short"]})
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


def test_sigkill_then_unmount_clears_dead_mount_and_remount_works(small_library, tmp_path):
    m = Mount(small_library, tmp_path / "mnt", tmp_path / "log")
    try:
        m.proc.kill()
        m.proc.wait(timeout=30)
        with pytest.raises(OSError) as info:
            os.listdir(m.mnt)
        assert info.value.errno == errno.ENOTCONN
        assert is_mounted(m.mnt)
        refused = subprocess.run(
            ecdcfs_cmd(str(small_library), str(m.mnt)), capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0 and "ecdcfs -u" in refused.stderr
        done = subprocess.run(
            ecdcfs_cmd("-u", str(m.mnt)), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert not is_mounted(m.mnt)
        again = Mount(small_library, m.mnt, tmp_path / "log2")
        try:
            assert (again.mnt / "a.txt").read_text() == "a"
        finally:
            again.stop()
    finally:
        m.stop()


def test_mounting_over_a_live_mount_is_refused(tmp_path, media):
    """libfuse's advice (-o nonempty) would stack a second daemon: ecdcfs refuses."""
    src = source_folder(tmp_path, {"x.ecdc": media["short"]})
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
        assert (mnt / "x.wav").read_bytes() == media["short_wav"]
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        assert sum(line.split(" ")[4] == str(mnt) for line in mountinfo) == 1


@needs_mount_helper
def test_mount_type_fuse_ecdcfs_and_fstab(tmp_path, media):
    """``mount -t fuse.ecdcfs``, the ``fuse`` + ``PROGRAM#SOURCE`` form, and fstab lines."""
    src = source_folder(tmp_path, {"x.ecdc": media["short"]})
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
            assert (mnt / "x.wav").read_bytes() == media["short_wav"]
            mounts_text = Path("/proc/mounts").read_text()
            fields = [line.split() for line in mounts_text.splitlines() if f" {mnt} " in line][0]
            assert fields[2] == "fuse.ecdcfs" and fields[3].startswith("ro"), fields
    finally:
        for mnt in mounts:
            unmount(mnt)
            wait_daemon_gone(mnt)
    assert "Traceback" not in log.read_text()


def test_a_daemon_without_syslog_logs_to_the_state_dir(tmp_path, media):
    """No --log-file, no syslog listening (containers, WSL): $XDG_STATE_HOME/ecdcfs/."""
    src = source_folder(tmp_path, {"x.ecdc": media["short"], "bad.ecdc": b"not ECDC"})
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
        assert (mnt / "x.wav").read_bytes() == media["short_wav"]
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


# ----- devices ----------------------------------------------------------------


def test_a_gpu_that_is_not_here_is_refused_at_mount(tmp_path, media):
    """Not at the first read: the mount is never made and nothing keeps running."""
    src = source_folder(tmp_path, {"x.ecdc": media["short"]})
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


@pytest.mark.skipif(
    subprocess.run(
        [sys.executable, "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]
    ).returncode,
    reason="CUDA is available here",
)
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "bogus"])
def test_unavailable_device_fails_reads_quickly_and_clearly(torch_home, tmp_path, device, caplog):
    data = synth.make_ecdc(samples=30_000, kbps=6)
    engine = Engine(Settings(device=device, cache_dir=None))
    try:
        audio = engine.open(tmp_path / "x.ecdc", data)
        started = time.monotonic()
        for _ in range(2):  # reported once, then remembered
            with pytest.raises(ModelUnavailable, match="device") as info:
                audio.read(0, 100_000)
        assert repr(device) in str(info.value)
        assert time.monotonic() - started < 60
    finally:
        engine.close()
    assert sum(r.levelno >= logging.ERROR for r in caplog.records) == 1


# ----- permissions and symlinks -----------------------------------------------


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
def test_allow_other_enforces_the_source_permissions(public_tmp, media):
    tmp_path = public_tmp
    src = tmp_path / "src"
    src.mkdir(mode=0o755)
    for name, mode in [("public.ecdc", 0o644), ("private.ecdc", 0o600)]:
        (src / name).write_bytes(media["short"])
        os.chmod(src / name, mode)
    (src / "secret").mkdir(mode=0o700)
    (src / "secret" / "s.ecdc").write_bytes(media["short"])
    (src / "notes.txt").write_text("hello")
    os.chmod(src / "notes.txt", 0o640)
    mnt = tmp_path / "mnt"
    mnt.mkdir(mode=0o755)
    m = Mount(src, mnt, tmp_path / "log", "--allow-other")
    try:
        assert stat.S_IMODE(os.stat(mnt / "private.wav").st_mode) == 0o400
        assert stat.S_IMODE(os.stat(mnt / "public.wav").st_mode) == 0o444
        ok = _as_nobody("cat", str(mnt / "public.wav"))
        assert ok.returncode == 0 and ok.stdout == media["short_wav"]
        for path in ("private.wav", "notes.txt", "secret/s.wav"):
            denied = _as_nobody("cat", str(mnt / path))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, path
        denied = _as_nobody("ls", str(mnt / "secret"))
        assert "Permission denied" in denied.stderr
        assert (mnt / "private.wav").read_bytes() == media["short_wav"]  # the owner reads
    finally:
        m.stop()
    # Without allow_other, other users cannot even look.
    m = Mount(src, mnt, tmp_path / "log2")
    try:
        assert "Permission denied" in _as_nobody("ls", str(mnt)).stderr
    finally:
        m.stop()


def test_symlinks_to_the_mount_point_are_not_followed_by_the_daemon(tmp_path, media):
    src = source_folder(tmp_path, {"x.ecdc": media["short"]})
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
        assert (mnt / "loop" / "loop" / "x.wav").read_bytes() == media["short_wav"]
        assert (mnt / "y.ecdc").read_bytes() == media["short_wav"]
        done = subprocess.run(
            ["find", "-L", str(mnt), "-maxdepth", "4"], capture_output=True, timeout=60
        )
        assert b"x.wav" in done.stdout
    finally:
        m.stop()


# ----- load -------------------------------------------------------------------
