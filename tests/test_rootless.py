"""cowfs mounted by a normal user, through fusermount3.

/dev/fuse is mode 0600 here, so each run gets a private mount namespace in
which an accessible /dev/fuse node is bound over it (what a distribution's
udev rule gives users); then everything runs as uid 65534 with Debian's
/usr/bin/python3 (the default python may live under /root, which users
cannot enter).  The user's upper dir is then mounted by the kernel's overlayfs
with `userxattr` in a user namespace: both show the same tree.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"
USER = "nobody"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set up the namespace"),
    pytest.mark.skipif(not os.access(PYTHON, os.X_OK) or shutil.which("fusermount3") is None,
                       reason="needs Debian's python3 and fuse3"),
]


def _readable_by_all(path: Path) -> bool:
    for p in [path, *path.parents]:
        if not os.stat(p).st_mode & 0o005:
            return False
    return True


def _run_as_user(tmp: Path, script: str) -> subprocess.CompletedProcess:
    """script runs as USER in a private mount namespace with a usable /dev/fuse."""
    dev = tmp / "dev-fuse"
    body = f"""
        set -e
        mknod {dev} c 10 229 && chmod 666 {dev}
        mount --bind {dev} /dev/fuse
        exec su -s /bin/bash {USER} -c {_quote(script)}
    """
    return subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", body],
                          capture_output=True, text=True, timeout=120)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture
def userdirs(tmp_path: Path):
    if not _readable_by_all(REPO):
        pytest.skip(f"{REPO} is not readable by other users")
    base = Path(f"/tmp/cowfs-rootless-{os.getpid()}-{tmp_path.name}")
    base.mkdir(mode=0o755)
    try:
        for d in ("l", "u", "w", "m", "k"):
            (base / d).mkdir()
        (base / "l/etc").mkdir()
        (base / "l/etc/hosts").write_text("lower\n")
        (base / "l/gone").write_text("bye\n")
        (base / "l/dir").mkdir()
        (base / "l/dir/old").write_text("old\n")
        (base / "l/tree/sub").mkdir(parents=True)
        (base / "l/tree/sub/leaf").write_text("leaf\n")
        subprocess.run(["chown", "-R", f"{USER}:", str(base)], check=True)
        yield base
    finally:
        subprocess.run(["umount", "-l", str(base / "m")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_user_mounts_copies_up_deletes_and_remounts(userdirs: Path):
    b = userdirs
    opts = f"lowerdir={b}/l,upperdir={b}/u,workdir={b}/w"
    cowfs = f"cd /tmp && PYTHONPATH={REPO} {PYTHON} -m cowfs -o {opts} {b}/m"
    script = textwrap.dedent(f"""
        set -e
        {cowfs}
        grep -q " {b}/m fuse.cowfs " /proc/mounts
        echo more >> {b}/m/etc/hosts
        rm {b}/m/gone
        rm -r {b}/m/dir && mkdir {b}/m/dir && echo new > {b}/m/dir/new
        mv {b}/m/tree {b}/m/moved
        ls {b}/m
        fusermount3 -u {b}/m
        {cowfs}
        echo remounted; ls {b}/m {b}/m/dir {b}/m/moved/sub; cat {b}/m/etc/hosts
        fusermount3 -u {b}/m
    """)
    res = _run_as_user(b, script)
    assert res.returncode == 0, res.stdout + res.stderr
    first, again = res.stdout.split("remounted\n")
    assert first.split() == ["dir", "etc", "moved"]
    assert "new" in again and "old" not in again and "leaf" in again
    assert again.strip().endswith("lower\nmore")
    # The upper dir is in the kernel's rootless format: 0/0 whiteouts, user.overlay marks.
    st = os.lstat(b / "u/gone")
    assert (st.st_mode & 0o170000, st.st_rdev) == (0o020000, 0)
    assert os.getxattr(b / "u/dir", "user.overlay.opaque") == b"y"
    assert not [n for n in os.listxattr(b / "u/dir") if n.startswith("trusted.")]


def test_kernel_userxattr_mount_reads_the_users_upper(userdirs: Path):
    """The rootless upper under `mount -t overlay -o userxattr` in a user namespace."""
    b = userdirs
    opts = f"lowerdir={b}/l,upperdir={b}/u,workdir={b}/w"
    script = textwrap.dedent(f"""
        set -e
        cd /tmp && PYTHONPATH={REPO} {PYTHON} -m cowfs -o {opts} {b}/m
        echo more >> {b}/m/etc/hosts
        rm {b}/m/gone
        rm -r {b}/m/dir && mkdir {b}/m/dir && echo new > {b}/m/dir/new
        find {b}/m | sort | sed 's|{b}/m||' > {b}/cowfs.txt
        fusermount3 -u {b}/m
        unshare -Urm sh -c 'mount -t overlay overlay -o userxattr,lowerdir={b}/l,upperdir={b}/u,workdir={b}/w {b}/k && find {b}/k | sort | sed "s|{b}/k||" && cat {b}/k/etc/hosts'
    """)
    res = _run_as_user(b, script)
    if res.returncode != 0 and "mount" in res.stderr and "permitted" in res.stderr:
        pytest.skip(f"the kernel refuses overlay mounts in user namespaces: {res.stderr}")
    assert res.returncode == 0, res.stdout + res.stderr
    kernel_view = res.stdout.split("lower\n")[0].split()
    assert kernel_view == (b / "cowfs.txt").read_text().split()
    assert res.stdout.endswith("lower\nmore\n")


def test_user_mounts_an_upper_the_kernel_wrote_with_userxattr(userdirs: Path):
    """The other way round: the kernel (in a user namespace, -o userxattr) writes
    the upper, the user's cowfs shows the same tree."""
    b = userdirs
    opts = f"lowerdir={b}/l,upperdir={b}/u,workdir={b}/w"
    script = textwrap.dedent(f"""
        set -e
        unshare -Urm sh -c 'mount -t overlay overlay -o userxattr,{opts} {b}/k && echo more >> {b}/k/etc/hosts && rm {b}/k/gone && rm -r {b}/k/dir && mkdir {b}/k/dir && echo new > {b}/k/dir/new && find {b}/k | sort | sed "s|{b}/k||" > {b}/kernel.txt'
        cd /tmp && PYTHONPATH={REPO} {PYTHON} -m cowfs -o {opts} {b}/m
        find {b}/m | sort | sed 's|{b}/m||'
        cat {b}/m/etc/hosts {b}/m/dir/new
        fusermount3 -u {b}/m
    """)
    res = _run_as_user(b, script)
    if res.returncode != 0 and "mount" in res.stderr and "permitted" in res.stderr:
        pytest.skip(f"the kernel refuses overlay mounts in user namespaces: {res.stderr}")
    assert res.returncode == 0, res.stdout + res.stderr
    tree, _, rest = res.stdout.partition("lower\n")
    assert tree.split() == (b / "kernel.txt").read_text().split()
    assert "/gone" not in tree and "/dir/old" not in tree
    assert rest == "more\nnew\n"
