"""The ``ecdcfs`` command line: parsing, -o key=value options, path checks, --help."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ecdcfs import cli, logs, mounts, options
from ecdcfs.cli import UsageError, build_parser, check_paths, parse_args
from ecdcfs.options import OPTIONS, Config, parse_mount_options
from helpers import cuda_device_count


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    return str(tmp_path / "src"), str(tmp_path / "mnt")


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ecdcfs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def test_defaults():
    cfg = parse_args(["a", "b"])
    assert (cfg.source, cfg.mountpoint) == ("a", "b")
    assert not cfg.foreground and not cfg.unmount and not cfg.allow_other
    assert (cfg.device, cfg.cache_mb, cfg.bufsize, cfg.cache_dir) == (None, 512, 1, None)
    assert cfg.persist and cfg.log_level == "info" and cfg.log_file is None
    assert cfg.fuse_options == {}


def test_long_options():
    cfg = parse_args(
        [
            "a",
            "b",
            "-f",
            "--device",
            "cuda:1",
            "--cache-mb",
            "64",
            "--bufsize",
            "3",
            "--cache-dir",
            "/c",
            "--no-persist",
            "--log-level",
            "DEBUG",
            "--log-file",
            "/l",
            "--allow-other",
        ]
    )
    assert cfg.foreground and cfg.allow_other and not cfg.persist
    assert (cfg.device, cfg.cache_mb, cfg.bufsize, cfg.cache_dir) == ("cuda:1", 64, 3, "/c")
    assert (cfg.log_level, cfg.log_file) == ("debug", "/l")


def test_every_long_option_as_o_key_value():
    cfg = parse_args(
        [
            "a",
            "b",
            "-o",
            "device=cpu,cache_mb=256,bufsize=2,log_level=debug",
            "-o",
            "allow_other,no-persist,cache-dir=/c,log_file=/l",
        ]
    )
    assert (cfg.device, cfg.cache_mb, cfg.bufsize, cfg.log_level) == ("cpu", 256, 2, "debug")
    assert cfg.allow_other and not cfg.persist
    assert (cfg.cache_dir, cfg.log_file) == ("/c", "/l")
    assert cfg.fuse_options == {}


def test_long_options_win_over_o():
    cfg = parse_args(["-o", "cache_mb=256,device=cpu", "a", "b", "--cache-mb", "32"])
    assert (cfg.cache_mb, cfg.device) == (32, "cpu")


def test_fuse_options_pass_through_and_mount_only_ones_are_dropped():
    ours, fuse = parse_mount_options(
        [
            "ro,rw,defaults,noauto,_netdev,x-systemd.automount,comment=x,allow_root,uid=1000,umask=022",
            "max_read=131072,auto_unmount,fsname=music\\,wav",
        ]
    )
    assert ours == {}
    assert fuse == {
        "allow_root": True,
        "uid": "1000",
        "umask": "022",
        "max_read": "131072",
        "auto_unmount": True,
        "fsname": "music,wav",
    }


def test_fuse_options_given_to_libfuse(tmp_path, monkeypatch):
    """SOURCE is the device (``mount``, ``findmnt``, ``df``), with libfuse's escapes."""
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(["a", "b", "-o", "allow_other,attr_timeout=5"])
    assert cli.fuse_options(cfg) == {
        "ro": True,
        "fsname": f"{tmp_path}/a",
        "subtype": "ecdcfs",
        "allow_other": True,
        "default_permissions": True,
        "attr_timeout": "5",
    }
    odd = parse_args(["my,music\\x", "b"])
    assert cli.fuse_options(odd)["fsname"] == f"{tmp_path}/my\\,music\\\\x"
    assert cli.fuse_options(parse_args(["a", "b", "-o", "fsname=x"]))["fsname"] == "x"


@pytest.mark.parametrize(
    "argv, reason",
    [
        ([], "expected SOURCE and MOUNTPOINT"),
        (["a"], "expected SOURCE and MOUNTPOINT"),
        (["a", "b", "c"], "expected SOURCE and MOUNTPOINT"),
        (["-u"], "-u takes exactly one"),
        (["-u", "a", "b"], "-u takes exactly one"),
        (["a", "b", "--cache-mb", "0"], "must be at least 1"),
        (["a", "b", "--cache-mb", "lots"], "not an integer"),
        (["a", "b", "--bufsize", "-1"], "must be at least 1"),
        (["a", "b", "--log-level", "loud"], "is not one of"),
        (["a", "b", "--bogus"], "unrecognized arguments"),
        (["a", "b", "-o", "cache_mb"], "needs a value"),
        (["a", "b", "-o", "cache_mb=x"], "not an integer"),
        (["a", "b", "-o", "bufsize=0"], "must be at least 1"),
        (["a", "b", "-o", "allow_other=1"], "takes no value"),
        (["a", "b", "-o", "log_level=loud"], "is not one of"),
        (["a", "b", "-o", "=x"], "bad -o option"),
        (["a", "b", "--device", "gpu"], "'gpu' is not a device"),
        (["a", "b", "--device", "cuda:"], "is not a device"),
        (["a", "b", "--device", "cuda:-1"], "is not a device"),
        (["a", "b", "-o", "device=CPU"], "-o device: 'CPU' is not a device"),
    ],
)
def test_bad_arguments(argv, reason):
    with pytest.raises(UsageError, match=reason):
        parse_args(argv)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_devices_that_parse(device):
    assert parse_args(["a", "b", "--device", device]).device == device
    assert parse_args(["a", "b", "-o", f"device={device}"]).device == device


def test_bad_arguments_exit_nonzero_with_one_line(capsys):
    assert cli.main(["a", "b", "--cache-mb", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ecdcfs: error: ")


def test_path_checks(dirs, tmp_path):
    src, mnt = dirs
    cfg = parse_args([src, mnt, "--cache-dir", str(tmp_path / "cache")])
    check_paths(cfg)
    assert cfg.source == os.path.realpath(src) and cfg.mountpoint == os.path.realpath(mnt)
    assert cfg.cache_dir == str(tmp_path / "cache")
    (tmp_path / "file").write_text("x")
    (tmp_path / "src" / "inner").mkdir()
    bad = [
        ([str(tmp_path / "nope"), mnt], "is not a directory"),
        ([str(tmp_path / "file"), mnt], "is not a directory"),
        ([src, str(tmp_path / "nope")], "No such file"),
        ([src, str(tmp_path / "file")], "is not a directory"),
        ([src, src], "inside SOURCE"),
        ([src, str(tmp_path / "src" / "inner")], "inside SOURCE"),
        ([str(tmp_path / "src" / "inner"), src], "inside MOUNTPOINT"),  # over a parent
        ([src, mnt, "--cache-dir", mnt + "/cache"], "cache dir"),
        ([src, mnt, "--log-file", mnt + "/log"], "log file"),
    ]
    for argv, reason in bad:
        with pytest.raises(UsageError, match=reason):
            check_paths(parse_args(argv))


def test_a_mountpoint_that_is_not_empty_is_refused_in_one_line_unless_nonempty(dirs):
    src, mnt = dirs
    (Path(mnt) / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not empty"):
        check_paths(parse_args([src, mnt]))
    check_paths(parse_args([src, mnt, "-o", "nonempty"]))  # asked for: no error
    done = run(src, mnt, "-f", "--device", "cpu")  # libfuse's own refusal is two lines, exit 1
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("ecdcfs: error: MOUNTPOINT") and "is not empty" in line
    assert not mounts.is_mounted(mnt)


def test_mount_over_source_parent_is_refused(tmp_path):
    (tmp_path / "music" / "ecdc").mkdir(parents=True)
    with pytest.raises(UsageError, match="SOURCE .* is inside MOUNTPOINT"):
        check_paths(parse_args([str(tmp_path / "music" / "ecdc"), str(tmp_path / "music")]))


def test_symlinked_paths_are_resolved(tmp_path, dirs):
    src, mnt = dirs
    os.symlink(src + "/", tmp_path / "src-link")
    inner = Path(src) / "inner"
    inner.mkdir()
    os.symlink(inner, tmp_path / "inner-link")
    with pytest.raises(UsageError, match="inside SOURCE"):
        check_paths(parse_args([str(tmp_path / "src-link"), str(tmp_path / "inner-link")]))


def test_no_persist_drops_cache_dir(dirs):
    cfg = parse_args([*dirs, "--no-persist", "--cache-dir", "/whatever"])
    check_paths(cfg)
    assert not cfg.persist


def test_split_options():
    assert options.split_options("a,b=1,,c\\,d=e\\\\f") == ["a", "b=1", "c,d=e\\f"]


def test_help_says_what_clear_cache_deletes():
    assert "code indexes and decoder graphs" in " ".join(run("--help").stdout.split())


def test_help_documents_everything():
    done = run("--help")
    assert done.returncode == 0
    for word in (
        "-f",
        "-o",
        "-u",
        "--device",
        "--cache-mb",
        "--bufsize",
        "--cache-dir",
        "--no-persist",
        "--log-level",
        "--log-file",
        "--allow-other",
        "key=value",
        "fusermount",
        "x.ecdc.wav",
        "syslog",
        "SIGTERM",
        "TORCH_HOME",
    ):
        assert word in done.stdout, word


def test_command_line_errors_in_a_subprocess(dirs, tmp_path):
    src, mnt = dirs
    for argv, reason in [
        ((src,), "expected SOURCE and MOUNTPOINT"),
        ((str(tmp_path / "nope"), mnt), "is not a directory"),
        ((src, os.path.join(src, ".")), "inside SOURCE"),
        ((src, mnt, "--wat"), "unrecognized arguments"),
    ]:
        done = run(*argv)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and reason in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_mount_over_a_mount_point_is_refused(dirs, monkeypatch):
    src, mnt = dirs
    monkeypatch.setattr(cli, "mount_points", lambda: {"/": "ext4", os.path.realpath(mnt): "tmpfs"})
    with pytest.raises(UsageError, match=r"MOUNTPOINT .* is already mounted \(tmpfs\)"):
        check_paths(parse_args([src, mnt]))


def test_a_gpu_that_is_not_here_is_refused_before_mounting(dirs):
    src, mnt = dirs
    count = cuda_device_count()
    missing = [f"cuda:{count}", "cuda:99"] + (["cuda"] if count == 0 else [])
    try:
        for device in missing:
            done = run(src, mnt, "--device", device)  # a daemon, were the device there
            assert done.returncode == 2, done.stderr
            assert done.stderr.count("\n") == 1, done.stderr
            assert done.stderr.startswith(f"ecdcfs: error: --device {device}: "), done.stderr
            assert "CUDA" in done.stderr and "--device cpu" in done.stderr
            assert not mounts.is_mounted(mnt)
    finally:
        if mounts.is_mounted(mnt):  # the test failed: leave no mount behind
            mounts.unmount(mnt)
    for device in ["cpu", *(["cuda", f"cuda:{count - 1}"] if count else [])]:
        cli.check_device(device, exact=False)  # no error


def test_unmount_of_something_not_mounted(dirs):
    done = run("-u", dirs[1])
    assert done.returncode == 1 and "not mounted" in done.stderr


def test_mountinfo_unescaping():
    assert mounts._unescape_mount_path("/mnt/a\\040b\\011c\\134d") == "/mnt/a b\tc\\d"
    assert "/" in mounts.mount_points() or not os.path.exists("/proc/self/mountinfo")


def test_logging_setup_foreground_and_file(tmp_path, dirs):
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        cfg = parse_args([*dirs, "-f", "--log-level", "warning"])
        handler = logs.setup_logging(cfg)
        assert isinstance(handler, logging.StreamHandler) and root.level == logging.WARNING
        root.removeHandler(handler)
        cfg = parse_args([*dirs, "--log-file", str(tmp_path / "x.log")])
        check_paths(cfg)
        handler = logs.setup_logging(cfg)
        logging.getLogger("ecdcfs.test").info("hello")
        handler.flush()
        assert "hello" in (tmp_path / "x.log").read_text()
        assert logging.getLogger("fuse").level == logging.WARNING
        root.removeHandler(handler)
        handler.close()
    finally:
        root.handlers[:] = before
        root.setLevel(logging.WARNING)


@pytest.fixture
def root_logger():
    """The root logger, its handlers and level restored after the test."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield root
    for handler in root.handlers:
        if handler not in before:
            handler.close()
    root.handlers[:] = before
    root.setLevel(logging.WARNING)


def test_a_daemon_without_syslog_logs_to_the_state_dir(
    tmp_path, dirs, monkeypatch, capsys, root_logger
):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    log_file = tmp_path / "state" / "ecdcfs" / "ecdcfs.log"
    dead = tmp_path / "dead-syslog"  # a socket that no daemon listens on any more
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(dead))
    for syslog in (tmp_path / "no-syslog", dead):
        monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(syslog))
        cfg = parse_args([*dirs])
        check_paths(cfg)
        handler = logs.setup_logging(cfg)
        logging.getLogger("ecdcfs.test").error("reason %s", syslog.name)
        handler.flush()
        assert f"ERROR ecdcfs.test: reason {syslog.name}" in log_file.read_text()
        assert capsys.readouterr().err == (
            f"ecdcfs: no syslog ({syslog}): the daemon logs to {log_file}\n"
        )
        root_logger.removeHandler(handler)
        handler.close()
    assert log_file.parent.stat().st_mode & 0o777 == 0o700


def test_a_daemon_logs_to_a_listening_syslog(tmp_path, dirs, monkeypatch, capsys, root_logger):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(tmp_path / "syslog"))
        syslog.settimeout(10)
        monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "syslog"))
        cfg = parse_args([*dirs])
        check_paths(cfg)
        handler = logs.setup_logging(cfg)
        logging.getLogger("ecdcfs.test").error("to syslog")
        message = syslog.recv(4096)  # <27>: facility daemon (3 * 8), severity error (3)
        assert message.startswith(b"<27>ecdcfs[") and b"ERROR ecdcfs.test: to syslog" in message
        root_logger.removeHandler(handler)
        handler.close()
    assert capsys.readouterr().err == "" and not (tmp_path / "state").exists()


def test_the_state_dir_log_may_not_be_inside_the_mount_point(dirs, monkeypatch, root_logger):
    monkeypatch.setenv("XDG_STATE_HOME", os.path.join(dirs[1], "state"))
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", "/nonexistent/syslog")
    cfg = parse_args([*dirs])
    check_paths(cfg)
    with pytest.raises(UsageError, match="inside MOUNTPOINT: use --log-file"):
        logs.setup_logging(cfg)


def test_import_of_the_command_does_not_import_torch():
    code = "import sys, ecdcfs.cli, ecdcfs.fs, ecdcfs.tree; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("module, prog", [("ecdcfs", "ecdcfs"), ("ecdcfs.stream", "ecdc-stream")])
def test_version_of_both_commands(module, prog):
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{prog} {version('ecdcfs')}\n" and done.stderr == ""


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_every_option_has_a_long_and_an_o_form(option):
    """One table: each option parses the same from --name and from -o key=value."""
    value = {"device": "cpu", "cache-dir": "/c", "log-file": "/l", "log-level": "debug"}
    value["backend"] = "onnx"
    text = value.get(option.name, "7")
    long = [f"--{option.name}"] + ([] if option.convert is None else [text])
    o_form = option.attr if option.convert is None else f"{option.attr}={text}"
    from_long = getattr(parse_args(["a", "b", *long]), option.attr)
    assert from_long == getattr(parse_args(["a", "b", "-o", o_form]), option.attr)
    assert from_long != getattr(Config(), option.attr)  # the option did something
    assert f"--{option.name}" in build_parser().format_help()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"TORCH_HOME": "/th"},
        {"XDG_CACHE_HOME": "/xdg"},
        {"TORCH_HOME": "/th", "XDG_CACHE_HOME": "/x"},
    ],
)
def test_checkpoint_dir_is_torch_hubs_without_importing_torch(monkeypatch, env):
    import torch.hub

    from ecdcfs.settings import checkpoint_dir

    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert checkpoint_dir() == Path(torch.hub.get_dir()) / "checkpoints"


def test_the_readme_option_table_is_the_option_spec():
    """Every option of options.OPTIONS has its row in the README's table, with its ``-o`` form
    (none for --foreground, which is -f), its metavar, and its default where the help
    says one; the table has no other row."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("| option | `-o` form | meaning |")
    rows = readme[start:].split("\n\n", 1)[0].splitlines()[2:]
    table = {}
    for row in rows:
        option, o_form, meaning = (cell.strip() for cell in row.strip("|").split("|", 2))
        table[option.strip("`").split()[0]] = (option, o_form.strip("`"), meaning)
    expected = {"-f" if o.name == "foreground" else f"--{o.name}": o for o in options.OPTIONS}
    assert table.keys() == expected.keys()
    for flag, option in expected.items():
        shown, o_form, meaning = table[flag]
        if option.name == "foreground":
            assert o_form == "", flag
            continue
        assert o_form.split("=")[0] == option.attr, flag
        if option.convert is None:
            assert "=" not in o_form and shown == f"`{flag}`", flag
        else:
            assert o_form.endswith("=" + shown.strip("`").split()[1]), flag
        default = (
            option.help.rsplit("(default: ", 1)[1].split(")")[0]
            if "(default: " in option.help
            else None
        )
        if default and default[0].isdigit():  # a number: the README gives it too
            assert default.split()[0] in meaning, (flag, default)


def test_exact_and_threads_options_long_and_o_forms():
    from ecdcfs.cli import UsageError, parse_args

    default = parse_args(["a", "b"])
    assert not default.exact and default.threads is None
    assert parse_args(["a", "b", "--exact"]).exact and parse_args(["a", "b", "-o", "exact"]).exact
    assert parse_args(["a", "b", "--threads", "3"]).threads == 3
    assert parse_args(["a", "b", "-o", "threads=1"]).threads == 1
    with pytest.raises(UsageError, match="threads"):
        parse_args(["a", "b", "-o", "threads=0"])
