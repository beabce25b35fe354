"""Helpers for the image tests: tar layers, OCI layouts and docker archives built
in the test, umoci, and tree snapshots to compare a mount with an unpacked image."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

UMOCI = shutil.which("umoci")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_umoci = pytest.mark.skipif(UMOCI is None, reason="umoci is not installed")
COWFS = [sys.executable, "-m", "cowfs"]
MTIME = 1_700_000_000

Member = tuple[tarfile.TarInfo, bytes | None]


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, mode: int = 0o644,
           uid: int = 0, gid: int = 0, mtime: float = MTIME, linkname: str = "",
           xattrs: dict[str, bytes] | None = None, dev: tuple[int, int] = (0, 0)) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime, ti.linkname = kind, mode, uid, gid, mtime, linkname
    ti.devmajor, ti.devminor = dev
    ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                      for k, v in (xattrs or {}).items()}
    if data is not None:
        ti.size = len(data)
    return ti, data


def file(name: str, data: bytes = b"", **kw: object) -> Member:
    return member(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def directory(name: str, mode: int = 0o755, **kw: object) -> Member:
    return member(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str) -> Member:
    return member(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def hardlink(name: str, target: str) -> Member:
    return member(name, tarfile.LNKTYPE, linkname=target)


def tar_bytes(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, how: str | None) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put_blob(layout: Path, data: bytes) -> str:
    d = sha(data)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / d[7:]).write_bytes(data)
    return d


def write_layout(layout: Path, tag: str, layers: list[bytes],
                 compression: str | None | list[str | None] = "gzip") -> dict:
    """An OCI image layout with one more image tagged tag; returns its manifest."""
    comps = compression if isinstance(compression, list) else [compression] * len(layers)
    descs = []
    for tar, comp in zip(layers, comps):
        blob = compress(tar, comp)
        mt = "application/vnd.oci.image.layer.v1.tar" + {"gzip": "+gzip", "zstd": "+zstd"}.get(
            comp or "", "")
        descs.append({"mediaType": mt, "digest": put_blob(layout, blob), "size": len(blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
                         "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]
                         }).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": put_blob(layout, config), "size": len(config)},
                "layers": descs}
    mbytes = json.dumps(manifest).encode()
    index_path = layout / "index.json"
    index: dict = json.loads(index_path.read_text()) if index_path.exists() else \
        {"schemaVersion": 2, "manifests": []}
    index["manifests"].append({"mediaType": manifest["mediaType"], "digest": put_blob(layout, mbytes),
                               "size": len(mbytes),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return manifest


def write_docker_archive(path: Path, repo_tag: str, layers: list[bytes],
                         blob_names: bool = False) -> None:
    """A `docker save` archive: classic (HEX.json, ID/layer.tar) or, with
    blob_names, as docker 25 writes it (blobs/sha256/HEX)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [sha(t) for t in layers]}}).encode()
    if blob_names:
        cname = "blobs/sha256/" + sha(config)[7:]
        names = ["blobs/sha256/" + sha(t)[7:] for t in layers]
    else:
        cname = sha(config)[7:] + ".json"
        names = [f"{hashlib.sha256(str(i).encode()).hexdigest()}/layer.tar"
                 for i in range(len(layers))]
    manifest = json.dumps([{"Config": cname, "RepoTags": [repo_tag], "Layers": names}]).encode()
    with tarfile.open(path, "w") as tf:
        for name, data in [(cname, config), *zip(names, layers), ("manifest.json", manifest)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def cowfs(*args: str, store: Path, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([*COWFS, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COWFS_STORE": str(store)})
    if check and res.returncode != 0:
        raise AssertionError(f"cowfs {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


def umoci(*args: str) -> None:
    res = subprocess.run([UMOCI or "umoci", *args], capture_output=True, text=True)
    assert res.returncode == 0, f"umoci {' '.join(args)}: {res.stderr[-2000:]}"


def umoci_unpack(image: str, bundle: Path) -> Path:
    if bundle.exists():
        shutil.rmtree(bundle)
    umoci("unpack", "--image", image, str(bundle))
    return bundle / "rootfs"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names
                        if not n.startswith(("trusted.overlay.", "user.overlay."))))


def snapshot(root: Path, dir_mtimes: bool = True, file_mtimes: bool = True
             ) -> dict[str, tuple]:
    """Everything a tree shows about itself, by path: type, mode, owner, mtime,
    content, symlink target, device number, xattrs and hard-link groups."""
    out: dict[str, dict] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            rec: dict = {"mode": oct(st.st_mode), "owner": (st.st_uid, st.st_gid),
                         "xattrs": _xattrs(p)}
            if dir_mtimes if stat.S_ISDIR(st.st_mode) else file_mtimes:
                rec["mtime"] = st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    rec["sha"] = hashlib.sha256(f.read()).hexdigest()[:16]
                groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = rec
    for paths in groups.values():
        if len(paths) > 1:
            for p in paths:
                out[p]["links"] = tuple(sorted(paths))
    return {k: tuple(sorted(v.items())) for k, v in sorted(out.items())}


def tree_diffs(got: Path, want: Path, dir_mtimes: bool = True,
               file_mtimes: bool = True) -> str:
    """'' when two trees look the same, else their first differences."""
    a, b = snapshot(got, dir_mtimes, file_mtimes), snapshot(want, dir_mtimes, file_mtimes)
    diffs = [f"{k}:\n  got  {a.get(k)}\n  want {b.get(k)}"
             for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return f"{got} differs from {want}:\n" + "\n".join(diffs[:20]) if diffs else ""


def assert_same_tree(got: Path, want: Path, dir_mtimes: bool = True,
                     file_mtimes: bool = True) -> None:
    diffs = tree_diffs(got, want, dir_mtimes, file_mtimes)
    assert not diffs, diffs


def _mounted_below(path: Path) -> bool:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].startswith(prefix) for line in f)


@pytest.fixture
def scratch(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A scratch dir under /tmp/image-helper (the image tests' own corner of /tmp)."""
    base = Path(os.environ.get("COWFS_IMAGE_TEST_DIR", "/tmp/image-helper"))
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=request.node.name[:40].replace("/", "_") + "-", dir=base))
    yield d
    if os.environ.get("COWFS_IMAGE_KEEP"):
        print(f"kept {d}")
    elif not _mounted_below(d):  # never delete through a mount that failed to go away
        shutil.rmtree(d, ignore_errors=True)


def _host_entries(path: str, out: dict[str, Member]) -> None:
    """path as the host has it, every symlink on the way included, into out."""
    parts = [p for p in path.split("/") if p]
    cur = ""
    for i, name in enumerate(parts):
        cur = f"{cur}/{name}"
        st = os.lstat(cur)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(cur)
            out.setdefault(cur[1:], symlink(cur[1:], target))
            rest = "/".join(parts[i + 1:])
            base = target if target.startswith("/") else os.path.join(os.path.dirname(cur), target)
            _host_entries(os.path.normpath(base + ("/" + rest if rest else "")), out)
            return
        if stat.S_ISDIR(st.st_mode):
            out.setdefault(cur[1:], directory(cur[1:], mode=stat.S_IMODE(st.st_mode)))
        else:
            with open(cur, "rb") as f:
                out[cur[1:]] = file(cur[1:], f.read(), mode=stat.S_IMODE(st.st_mode))


def shell_layer() -> bytes:
    """A layer with the host's /bin/sh and the libraries it needs: enough to chroot into."""
    sh = os.path.realpath("/bin/sh")
    libs = subprocess.run(["ldd", sh], capture_output=True, text=True, check=True).stdout
    paths = ["/bin/sh", "/bin/" + os.path.basename(sh)]
    paths += [w for line in libs.splitlines() for w in line.split() if w.startswith("/")]
    out: dict[str, Member] = {}
    for p in paths:
        _host_entries(p, out)
    return tar_bytes([out[k] for k in sorted(out)])


def build_umoci_image(scratch: Path, shell: bool = False) -> str:
    """An image with whiteouts, an opaque dir, hard links, symlinks, xattrs, odd
    modes and owners, made by umoci; with shell, a /bin/sh layer below them."""
    layout = scratch / "oci"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:t")
    if shell:
        blob = scratch / "shell.tar"
        blob.write_bytes(shell_layer())
        tmp = scratch / "shell"
        tmp.mkdir()
        subprocess.run(["tar", "-xpf", str(blob), "-C", str(tmp)], check=True)
        umoci("insert", "--image", f"{layout}:t", str(tmp), "/")
    src = scratch / "src1"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("base\n")
    (src / "etc" / "big").write_bytes(os.urandom(100_000))
    (src / "data" / "sub").mkdir(parents=True)
    (src / "data" / "a").write_text("a\n")
    os.link(src / "data" / "a", src / "data" / "a-link")
    os.symlink("../etc/hostname", src / "data" / "sym")
    (src / "data" / "sub" / "b").write_text("b\n")
    os.chmod(src / "data" / "sub" / "b", 0o4755)
    os.setxattr(src / "data" / "a", "user.color", b"blue")
    (src / "opq").mkdir()
    (src / "opq" / "old").write_text("old\n")
    (src / "tmp").mkdir()
    os.chmod(src / "tmp", 0o1777)
    os.chown(src / "etc" / "hostname", 1000, 1000)
    umoci("insert", "--image", f"{layout}:t", str(src), "/")
    umoci("insert", "--image", f"{layout}:t", "--whiteout", "/data/sub")
    new = scratch / "src2"
    new.mkdir()
    (new / "fresh").write_text("fresh\n")
    umoci("insert", "--image", f"{layout}:t", "--opaque", str(new), "/opq")
    return f"{layout}:t"


_cowfs_unready: list[str | None] = []


def _cmdline_has(pid: int, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False


def cowfs_unready() -> str | None:
    """Why cowfs mounts cannot be tested here (None: they work).  Probed once, in
    subprocesses with timeouts, since a daemon that does not answer hangs callers."""
    if _cowfs_unready:
        return _cowfs_unready[0]
    from cowfs.state import find_mount

    from .mountutil import unmount
    base = Path(tempfile.mkdtemp(prefix="probe-", dir="/tmp/image-helper"))
    (base / "lower").mkdir()
    (base / "lower" / "f").write_text("f")
    mnt = base / "mnt"
    mnt.mkdir()
    reason: str | None = None
    pid = None
    try:
        res = subprocess.run([*COWFS, "-o", f"lowerdir={base / 'lower'}", str(mnt)],
                             capture_output=True, text=True, timeout=30)
        rec = find_mount(str(mnt))
        pid = rec.get("pid") if rec else None
        if res.returncode != 0:
            reason = f"cowfs does not mount: {res.stderr.strip()[-300:]}"
        else:
            probe = subprocess.run([sys.executable, "-c", "import os, sys; "
                                    "print(os.listdir(sys.argv[1]))", str(mnt)],
                                   capture_output=True, text=True, timeout=15)
            if probe.stdout.strip() != "['f']":
                reason = f"a cowfs mount lists {probe.stdout.strip()!r} {probe.stderr[-300:]}"
    except subprocess.TimeoutExpired:
        reason = "a cowfs mount does not answer"
    finally:
        unmount(mnt)
        if pid and _cmdline_has(pid, str(mnt)):
            os.kill(pid, 9)  # the probe's own daemon, by the pid it recorded
        if not _mounted_below(base):
            shutil.rmtree(base, ignore_errors=True)
    _cowfs_unready.append(reason)
    return reason


@pytest.fixture(params=["kernel", "cowfs"])
def mount_kind(request: pytest.FixtureRequest) -> str:
    """Run a mount test over kernel overlayfs (the reference) and over cowfs."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    if request.param == "cowfs" and (reason := cowfs_unready()):
        pytest.skip(reason)
    return request.param


def recreate_dir(path: Path, mount_kind: str) -> None:
    """mkdir where a directory was just deleted: an opaque dir in the upper."""
    try:
        path.mkdir()
    except FileNotFoundError:
        if mount_kind != "cowfs":
            raise
        pytest.xfail("cowfs bug: mkdir where a lower dir was just removed makes the opaque "
                     "dir in the upper but returns ENOENT")
