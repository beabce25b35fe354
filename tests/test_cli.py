"""The command line: bad input, lifecycle, the mount helper form."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cowfs.overlay.params import UsageError, parse_mount_options, split_options, validate

from .conftest import write
from .mountutil import COWFS, is_mountpoint, mounted, unmount


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*COWFS, *args], capture_output=True, text=True, timeout=60)


# -- option parsing, no mount ------------------------------------------------
def test_split_options_tolerates_empty_and_repeats():
    assert split_options(["lowerdir=a,,upperdir=b", "workdir=c,volatile,"]) == {
        "lowerdir": "a", "upperdir": "b", "workdir": "c", "volatile": None}


def test_parse_resolves_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_mount_options(["lowerdir=a:b,upperdir=u,workdir=w,ro,nodev,context=x"], "m")
    assert cfg.lowerdirs == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert cfg.upperdir == str(tmp_path / "u") and cfg.mountpoint == str(tmp_path / "m")
    assert cfg.read_only and "nodev" in cfg.kernel_flags


@pytest.mark.parametrize("opts,msg", [
    (["upperdir=u,workdir=w"], "missing lowerdir"),
    (["lowerdir=a,upperdir=u"], "together"),
    (["lowerdir=a,workdir=w"], "together"),
    (["lowerdir=a,frobnicate"], "unknown mount option 'frobnicate'"),
    (["lowerdir=a:"], "empty path"),
    (["lowerdir=::b"], "empty path"),
    (["lowerdir=a:::b"], "empty path"),
    (["lowerdir=a::d:b"], "regular layer after data-only"),
    (["lowerdir=a::d,metacopy=off"], "data-only lower layers"),
    (["lowerdir=a", "lowerdir=b"], "lowerdir= given twice"),
    (["lowerdir=a,upperdir=u,workdir=w,upperdir=v"], "upperdir= given twice"),
    (["lowerdir=a,redirect_dir=sideways"], "bad value for redirect_dir"),
    (["lowerdir=a,metacopy=yes"], "bad value for metacopy"),
    (["lowerdir=a,index=1"], "bad value for index"),
    (["lowerdir=a,xino=maybe"], "bad value for xino"),
    (["lowerdir=a,upperdir=u,workdir=w,metacopy=on,redirect_dir=follow"],
     "conflicting options: metacopy=on,redirect_dir=follow"),
    (["lowerdir=a,userxattr,redirect_dir=on"], "conflicting options: userxattr,redirect_dir=on"),
    (["lowerdir=a,userxattr,metacopy=on"], "conflicting options: userxattr,metacopy=on"),
    (["lowerdir=a,uidmapping=0:1000"], "bad value for uidmapping"),
    (["lowerdir=a,gidmapping=0:1000:0"], "bad value for gidmapping"),
    (["lowerdir=a,uidmapping=0:x:1"], "bad value for uidmapping"),
    (["lowerdir=a,squash_to_root"], "'squash_to_root' is not supported"),
    (["lowerdir=a,squash_to_uid=0"], "'squash_to_uid=0' is not supported"),
    (["lowerdir=a,static_nlink"], "'static_nlink' is not supported"),
    (["lowerdir=a,noxattrs=1"], "'noxattrs=1' is not supported"),
])
def test_parse_errors(opts, msg):
    with pytest.raises(UsageError, match=msg):
        parse_mount_options(opts, "/mnt")


def _cfg(*opts: str):
    return parse_mount_options(list(opts), "/mnt")


def test_parse_escaped_paths_and_data_layers():
    cfg = _cfg(r"lowerdir=/l\:1:/l\,2::/d\:1::/d2,upperdir=/u\,p,workdir=/w,fsname=my\,fs")
    assert cfg.lowerdirs == ["/l:1", "/l,2", "/d:1", "/d2"] and cfg.data_layers == 2
    assert cfg.upperdir == "/u,p" and cfg.fsname == "my,fs"


def test_redirect_modes_like_the_kernel():
    up = "lowerdir=/l,upperdir=/u,workdir=/w"
    # cowfs' defaults: redirects written and followed, metacopy on
    cfg = _cfg(up)
    assert (cfg.redirect_dir, cfg.follow_redirects, cfg.metacopy) == ("on", True, True)
    # follow: follow, never write; an explicit redirect_dir turns the default metacopy off
    cfg = _cfg(up + ",redirect_dir=follow")
    assert (cfg.redirect_dir, cfg.follow_redirects, cfg.metacopy) == ("follow", True, False)
    # off still follows (redirect_always_follow=Y, the kernel's default)
    cfg = _cfg(up + ",redirect_dir=off")
    assert (cfg.follow_redirects, cfg.metacopy) == (True, False)
    cfg = _cfg(up + ",redirect_dir=nofollow")
    assert (cfg.follow_redirects, cfg.metacopy) == (False, False)
    # metacopy=on alone turns redirect_dir on
    assert _cfg(up + ",redirect_dir=on,metacopy=off").metacopy is False
    # no upper: follow is on (nothing is written)
    assert _cfg("lowerdir=/l,redirect_dir=follow,metacopy=on").redirect_dir == "on"


def test_userxattr_turns_redirects_and_metacopy_off():
    cfg = _cfg("lowerdir=/l,upperdir=/u,workdir=/w,userxattr")
    assert cfg.userxattr and (cfg.redirect_dir, cfg.metacopy) == ("nofollow", False)
    assert _cfg("lowerdir=/l,userxattr,redirect_dir=nofollow").redirect_dir == "nofollow"


def test_id_mappings_parse_as_fuse_overlayfs_takes_them():
    from cowfs.overlay.params import IdRange
    cfg = _cfg("lowerdir=/l,uidmapping=0:1000:1:1:110000:65536,gidmapping=0:1000:1")
    assert cfg.uidmapping == (IdRange(0, 1000, 1), IdRange(1, 110000, 65536))
    assert cfg.gidmapping == (IdRange(0, 1000, 1),)


def test_index_xino_and_the_rest():
    cfg = _cfg("lowerdir=/l,upperdir=/u,workdir=/w,index=on,xino=off")
    assert cfg.index and cfg.xino == "off"
    assert not _cfg("lowerdir=/l,index=on").index   # useless without an upper: off
    assert not _cfg("lowerdir=/l").index


def test_same_directory_twice_is_refused(dirs):
    d = dirs
    cfg = parse_mount_options([f"lowerdir={d['low']}:{d['low']}/."], str(d["mnt"]))
    with pytest.raises(UsageError, match="in the layer stack twice"):
        validate(cfg)
    cfg = parse_mount_options([f"lowerdir={d['low']},upperdir={d['low']},workdir={d['work']}"],
                              str(d["mnt"]))
    with pytest.raises(UsageError, match="in the layer stack twice"):
        validate(cfg)


def test_version():
    res = run("--version")
    assert res.returncode == 0 and "cowfs" in res.stdout


# -- bad input through the real command: one line, non-zero, nothing mounted --
@pytest.fixture
def dirs(tmp_path):
    d = {n: tmp_path / n for n in ("low", "up", "work", "mnt")}
    for p in d.values():
        p.mkdir()
    write(d["low"] / "f", "x")
    return d


def _bad(dirs, opts: str, mnt: Path | None = None) -> str:
    mnt = mnt or dirs["mnt"]
    before = {p: sorted(os.listdir(p)) for p in (dirs["up"], dirs["work"], dirs["low"])}
    res = run("-o", opts, str(mnt))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert not is_mountpoint(dirs["mnt"])
    assert {p: sorted(os.listdir(p)) for p in before} == before
    return lines[0]


def test_bad_inputs(dirs, tmp_path):
    low, up, work = dirs["low"], dirs["up"], dirs["work"]
    assert "missing lowerdir" in _bad(dirs, f"upperdir={up},workdir={work}")
    assert "does not exist" in _bad(dirs, f"lowerdir={tmp_path}/nope")
    write(tmp_path / "file", "x")
    assert "not a directory" in _bad(dirs, f"lowerdir={tmp_path}/file")
    assert "together" in _bad(dirs, f"lowerdir={low},upperdir={up}")
    assert "together" in _bad(dirs, f"lowerdir={low},workdir={work}")
    (up / "w").mkdir()
    assert "inside" in _bad(dirs, f"lowerdir={low},upperdir={up},workdir={up}/w")
    os.rmdir(up / "w")
    assert "in the layer stack twice" in _bad(dirs, f"lowerdir={up},upperdir={up},workdir={work}")
    shm = Path("/dev/shm") / f"cowfs-test-{os.getpid()}"
    shm.mkdir()
    try:
        assert "same filesystem" in _bad(dirs, f"lowerdir={low},upperdir={up},workdir={shm}")
    finally:
        shm.rmdir()
    assert "mountpoint" in _bad(dirs, f"lowerdir={low}", tmp_path / "nomnt")
    assert "not a directory" in _bad(dirs, f"lowerdir={low}", tmp_path / "file")
    assert "unknown mount option 'bogus'" in _bad(dirs, f"lowerdir={low},bogus")


def test_already_mounted(dirs):
    with mounted([*COWFS, "-o", f"lowerdir={dirs['low']}", str(dirs["mnt"])], dirs["mnt"]):
        res = run("-o", f"lowerdir={dirs['low']}", str(dirs["mnt"]))
        assert res.returncode != 0 and "already mounted" in res.stderr


def test_no_access_to_dev_fuse(dirs):
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          *COWFS, "-o", f"lowerdir={dirs['low']}", str(dirs["mnt"])],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode != 0
    assert not is_mountpoint(dirs["mnt"])


# -- lifecycle ----------------------------------------------------------------
def _daemon_pid(mnt: Path) -> int:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(mnt).encode() in cmd and int(pid) != os.getpid():
                return int(pid)
    raise AssertionError("no daemon found")


def _wait_gone(pid: int) -> None:
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}") or \
                Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon {pid} still running")


def test_detaches_and_umount_ends_daemon(dirs):
    mnt = dirs["mnt"]
    with mounted([*COWFS, "-o", f"lowerdir={dirs['low']}", str(mnt)], mnt):
        assert (mnt / "f").read_text() == "x"
        pid = _daemon_pid(mnt)
        assert subprocess.run(["umount", str(mnt)]).returncode == 0
        _wait_gone(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts(dirs, sig):
    mnt = dirs["mnt"]
    with mounted([*COWFS, "-o", f"lowerdir={dirs['low']}", str(mnt)], mnt):
        pid = _daemon_pid(mnt)
        os.kill(pid, sig)
        _wait_gone(pid)
        assert not is_mountpoint(mnt)


def test_foreground_and_cowfs_umount(dirs):
    mnt = dirs["mnt"]
    proc = subprocess.Popen([*COWFS, "-f", "-o", f"lowerdir={dirs['low']}", str(mnt)])
    try:
        for _ in range(100):
            if is_mountpoint(mnt):
                break
            time.sleep(0.05)
        assert is_mountpoint(mnt)
        assert run("umount", str(mnt)).returncode == 0
        assert proc.wait(timeout=20) == 0
    finally:
        unmount(mnt)
        if proc.poll() is None:
            proc.kill()


def test_subcommand_mount(dirs):
    mnt = dirs["mnt"]
    cmd = [*COWFS, "mount", "--lower", str(dirs["low"]), "--upper", str(dirs["up"]),
           "--work", str(dirs["work"]), str(mnt)]
    with mounted(cmd, mnt):
        (mnt / "new").write_text("n")
    assert (dirs["up"] / "new").read_text() == "n"


def test_mount_helper_form(dirs, tmp_path):
    """mount -t fuse.cowfs runs `cowfs SOURCE MNT -o OPTS` via mount.fuse3."""
    if shutil.which("cowfs", path="/usr/local/bin:/usr/bin:/usr/sbin:/sbin:/bin") is None:
        pytest.skip("scripts/setup links /usr/local/bin/cowfs (as root)")
    mnt = dirs["mnt"]
    opts = f"lowerdir={dirs['low']},upperdir={dirs['up']},workdir={dirs['work']}"
    with mounted(["mount", "-t", "fuse.cowfs", "cowfs", str(mnt), "-o", opts], mnt):
        assert (mnt / "f").read_text() == "x"
    res = run("cowfs", str(mnt), "-o", f"lowerdir={dirs['low']}")
    try:
        assert res.returncode == 0, res.stderr
        assert is_mountpoint(mnt)
    finally:
        unmount(mnt)
