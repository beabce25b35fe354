"""Safe extraction of one layer tarball into an empty directory.

A layer is untrusted: every entry is created relative to a directory fd reached
one component at a time with O_NOFOLLOW, so no name in the archive can lead
outside the layer, whatever symlinks earlier entries created.  `..` and hard
links that leave the layer are refused; absolute names are taken relative to the
layer root (as docker does); device nodes are skipped unless running as root.

The result is one canonical form whoever unpacks and in whatever order the
archive lists its entries: whiteouts are kernel-form (char 0/0, which any user
may create since Linux 5.8), opaque directories carry overlay.opaque=y (in
trusted. as root, in user. otherwise: the kernel's userxattr rule).  A whiteout
hides only what is below the layer (the OCI rule): a layer holding both
`.wh.d` and `d/` deletes the lower `d` and keeps its own, which therefore is an
opaque directory, whichever of the two comes first.
"""
from __future__ import annotations

import base64
import errno
import os
import shutil
import stat
import tarfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from ..overlay.layers import DIR_FLAGS, lstat_or_none, xattr_path
from .errors import ImageError
from .merged import Stack, close_sources
from ..overlay.format import (OPAQUE_MARKER, WH_PREFIX, Format, Kind, is_private_xattr,
                              oci_form, public_xattrs)

Parts = tuple[bytes, ...]
COPY_CHUNK = 1 << 20


class UnsafeEntry(ImageError):
    """An archive entry that would write outside the layer; the import stops."""


@dataclass
class UnpackStats:
    entries: int = 0
    file_bytes: int = 0
    warnings: list[str] = field(default_factory=list)


def split_name(raw: str, warn: Callable[[str], None] | None = None) -> Parts:
    """Components of an archive name; '..' is refused, '/x' becomes 'x'."""
    name = os.fsencode(raw)
    parts = tuple(p for p in name.split(b"/") if p not in (b"", b"."))
    if b".." in parts:
        raise UnsafeEntry(f"refusing archive entry {raw!r}: '..' in the path")
    if name.startswith(b"/") and warn is not None:
        warn(f"entry {raw!r}: absolute path, unpacked relative to the layer root")
    return parts


def _pax_ns(text: str) -> int:
    sec, _, frac = text.partition(".")
    frac_ns = int((frac + "000000000")[:9]) if frac else 0
    return int(sec) * 10**9 + (-frac_ns if sec.startswith("-") else frac_ns)


def times_ns(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns, exact when PAX records carry the fraction."""
    mtime = _pax_ns(m.pax_headers["mtime"]) if "mtime" in m.pax_headers \
        else int(m.mtime) * 10**9
    atime = _pax_ns(m.pax_headers["atime"]) if "atime" in m.pax_headers else mtime
    return atime, mtime


def tar_xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    """xattrs from PAX records, in GNU/star (SCHILY) and bsdtar (LIBARCHIVE) form."""
    out: dict[str, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return out


def _shown(parts: Parts) -> str:
    return os.fsdecode(b"/".join(parts)) or "/"


class Unpacker:
    """Applies tar entries to the layer directory open as root_fd.

    privileged: keep owners and device nodes, and mark opaque directories in
    trusted. (else user.) xattrs.
    """

    def __init__(self, root_fd: int, *, privileged: bool, below: Stack | None = None) -> None:
        self.root_fd = root_fd
        self.privileged = privileged
        self.opaque_xattr = Format.for_mount(userxattr=not privileged).xattr("opaque")
        self.below = below
        # Names this layer whites out: an entry of its own at such a name stays,
        # and a directory there is opaque (the lower one is deleted).
        self._whited: set[Parts] = set()
        self.stats = UnpackStats()
        self._cached: tuple[Parts, int] | None = None
        # Directory modes and times, applied after their contents are written.
        self._dirs: dict[Parts, tuple[int, int, int]] = {}
        # Directories the archive implies but has no entry for, the root included.
        self._implicit: set[Parts] = {()}
        self._warned: set[str] = set()

    # -- directories ---------------------------------------------------------
    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def close(self) -> None:
        self._drop_cache()

    def _dir(self, parts: Parts, create: bool, shown: str) -> int:
        """A new fd for the directory at parts, creating missing ones if asked."""
        if self._cached is not None and self._cached[0] == parts:
            return os.dup(self._cached[1])
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts):
                try:
                    nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise UnsafeEntry(f"refusing {shown}: "
                                          f"{_shown(parts[:i + 1])} is not in this layer") from None
                    nfd = self._mkdir_implied(fd, parts[:i + 1])
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                    if not (create and parts[:i + 1] in self._whited and stat.S_ISCHR(st.st_mode)):
                        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                        raise UnsafeEntry(f"refusing {shown}: {_shown(parts[:i + 1])} is {what} "
                                          "in this layer (no writing through it)") from None
                    # This layer's whiteout, and now a directory of its own there.
                    os.unlink(comp, dir_fd=fd)
                    nfd = self._mkdir_implied(fd, parts[:i + 1])
                    self._set_opaque(nfd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self._drop_cache()
        self._cached = (parts, os.dup(fd))
        return fd

    def _mkdir_implied(self, pfd: int, parts: Parts) -> int:
        os.mkdir(parts[-1], 0o755, dir_fd=pfd)
        fd = os.open(parts[-1], DIR_FLAGS, dir_fd=pfd)
        os.fchmod(fd, 0o755)  # regardless of the umask
        self._implicit.add(parts)
        return fd

    def _remove(self, pfd: int, parts: Parts, keep_dir: bool) -> os.stat_result | None:
        """Clear the way for a new entry; returns what stays (a kept directory)."""
        st = lstat_or_none(pfd, parts[-1])
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return st
            self._drop_cache()
            shutil.rmtree(parts[-1], dir_fd=pfd)
            n = len(parts)
            self._dirs = {k: v for k, v in self._dirs.items() if k[:n] != parts}
            self._implicit = {k for k in self._implicit if k[:n] != parts}
            self._whited = {k for k in self._whited if k[:n] != parts or k == parts}
        else:
            os.unlink(parts[-1], dir_fd=pfd)
        return None

    # -- entries -------------------------------------------------------------
    def warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            self.stats.warnings.append(msg)

    def extract(self, tf: tarfile.TarFile) -> UnpackStats:
        while True:
            try:
                m = tf.next()
            except tarfile.ReadError as e:
                # umoci 0.4 ends layers right after the last file's data, without
                # padding or end blocks; Go's reader accepts that, and the diff_id
                # check still proves the stream is what the image names.
                if str(e) != "unexpected end of data" or not self.stats.entries:
                    raise
                break
            if m is None:
                break
            # A stream needs no index: keep memory flat on big layers.
            tf.members.clear()  # type: ignore[attr-defined]
            self.entry(m, tf)
        self.finish()
        return self.stats

    def entry(self, m: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        parts = split_name(m.name, self.warn)
        self.stats.entries += 1
        if not parts:
            if m.isdir():  # the layer root's own metadata
                self._meta(self.root_fd, None, m)
                self._dirs[()] = (m.mode & 0o7777, *times_ns(m))
                self._implicit.discard(())
            return
        name = parts[-1]
        if name.startswith(WH_PREFIX) and self._whiteout(parts, m):
            return
        pfd = self._dir(parts[:-1], True, f"archive entry {m.name!r}")
        try:
            self._create(pfd, parts, m, tf)
        finally:
            os.close(pfd)

    def _whiteout(self, parts: Parts, m: tarfile.TarInfo) -> bool:
        """Handle a `.wh.` entry; False means it is an ordinary name after all."""
        name = parts[-1]
        shown = f"whiteout {m.name!r}"
        if name == OPAQUE_MARKER:
            fd = self._dir(parts[:-1], True, shown)
            try:
                self._set_opaque(fd)
            finally:
                os.close(fd)
            return True
        form = oci_form(name)
        if form is None or form.kind is Kind.MARKER:
            self.warn(f"skipped AUFS metadata entry {m.name!r}")
            return True
        target = parts[:-1] + (name[len(WH_PREFIX):],)
        pfd = self._dir(parts[:-1], True, shown)
        try:
            self._whited.add(target)
            st = lstat_or_none(pfd, target[-1])
            if st is None:
                self._mknod_whiteout(pfd, target[-1], shown)
            elif stat.S_ISDIR(st.st_mode):  # this layer's own directory: it replaces the lower
                fd = os.open(target[-1], DIR_FLAGS, dir_fd=pfd)
                try:
                    self._set_opaque(fd)
                finally:
                    os.close(fd)
            # Any other entry of this layer at that name already hides the lower one.
        finally:
            os.close(pfd)
        return True

    def _mknod_whiteout(self, pfd: int, name: bytes, shown: str) -> None:
        try:
            os.mknod(name, stat.S_IFCHR, 0, dir_fd=pfd)
        except PermissionError:
            raise ImageError(f"cannot create {shown}: this kernel lets only root make "
                             "whiteouts (Linux 5.8 or later allows it)") from None

    def _set_opaque(self, fd: int) -> None:
        os.setxattr(fd, self.opaque_xattr, b"y")

    def _create(self, pfd: int, parts: Parts, m: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        name = parts[-1]
        if m.isdir():
            if self._remove(pfd, parts, keep_dir=True) is None:
                os.mkdir(name, 0o700, dir_fd=pfd)
            if parts in self._whited:
                fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
                try:
                    self._set_opaque(fd)
                finally:
                    os.close(fd)
            self._meta(pfd, name, m)
            self._dirs[parts] = (m.mode & 0o7777, *times_ns(m))
            self._implicit.discard(parts)
            return
        if m.islnk():
            self._hardlink(pfd, parts, m)
            return
        if (m.ischr() or m.isblk()) and not self.privileged:
            self.warn(f"skipped device node {m.name!r} (needs root)")
            return
        if not (m.isreg() or m.issym() or m.ischr() or m.isblk() or m.isfifo()):
            self.warn(f"skipped {m.name!r}: unsupported tar entry type {m.type!r}")
            return
        self._remove(pfd, parts, keep_dir=False)
        if m.isreg():
            self._write_file(pfd, name, m, tf)
            return
        if m.issym():
            os.symlink(m.linkname, name, dir_fd=pfd)
        elif m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
        self._meta(pfd, name, m)

    def _write_file(self, pfd: int, name: bytes, m: tarfile.TarInfo,
                    tf: tarfile.TarFile) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=pfd)
        try:
            src = tf.extractfile(m) if m.size else None
            while src is not None and (chunk := src.read(COPY_CHUNK)):
                _write_all(fd, chunk)
                self.stats.file_bytes += len(chunk)
        finally:
            os.close(fd)
        self._meta(pfd, name, m)

    def _hardlink(self, pfd: int, parts: Parts, m: tarfile.TarInfo) -> None:
        shown = f"hard link {m.name!r} -> {m.linkname!r}"
        target = split_name(m.linkname)
        if not target:
            raise UnsafeEntry(f"refusing {shown}: the target is the layer root")
        tfd = self._dir(target[:-1], False, shown)
        try:
            tst = lstat_or_none(tfd, target[-1])
            if tst is None:
                raise UnsafeEntry(f"refusing {shown}: the target is not in this layer")
            if stat.S_ISDIR(tst.st_mode):
                raise UnsafeEntry(f"refusing {shown}: the target is a directory")
            cur = lstat_or_none(pfd, parts[-1])
            if cur is not None and (cur.st_dev, cur.st_ino) == (tst.st_dev, tst.st_ino):
                return
            self._remove(pfd, parts, keep_dir=False)
            os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    # -- metadata ------------------------------------------------------------
    def _meta(self, pfd: int, name: bytes | None, m: tarfile.TarInfo) -> None:
        """Owner, mode, xattrs and (except for directories) times of one entry.

        name None means pfd itself.  Order matters: chown clears setuid bits
        and file capabilities, so mode and xattrs come after it.
        """
        if self.privileged:
            if name is None:
                os.fchown(pfd, m.uid, m.gid)
            else:
                os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if not m.issym() and not m.isdir():
            self._chmod(pfd, name, m.mode & 0o7777)
        self._set_xattrs(pfd, name, m)
        if name is not None and not m.isdir():  # directories get theirs in finish()
            os.utime(name, ns=times_ns(m), dir_fd=pfd, follow_symlinks=False)

    def _chmod(self, pfd: int, name: bytes | None, mode: int) -> None:
        if name is None:
            os.fchmod(pfd, mode)
            return
        # O_PATH opens devices and fifos without side effects; chmod through the
        # /proc link reaches exactly this inode, never a symlink's target.
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def _set_xattrs(self, pfd: int, name: bytes | None, m: tarfile.TarInfo) -> None:
        path: int | bytes = pfd if name is None else xattr_path(pfd, name)
        for key, value in tar_xattrs(m).items():
            if is_private_xattr(key):
                self.warn(f"dropped overlay xattr {key} of {m.name!r} (not image content)")
                continue
            self._setxattr(path, key, value)

    def _setxattr(self, path: int | bytes, key: str, value: bytes) -> None:
        try:
            os.setxattr(path, key, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                raise
            self.warn(f"could not keep xattr {key.split('.')[0]}.* ({os.strerror(e.errno)})")

    def finish(self) -> None:
        """Directory modes and times, deepest first so parents stay put."""
        self._drop_cache()
        for parts in sorted(self._dirs.keys() | self._implicit, key=len, reverse=True):
            fd = self._dir(parts, False, "directory") if parts else os.dup(self.root_fd)
            try:
                if parts in self._dirs:
                    mode, atime, mtime = self._dirs[parts]
                    os.fchmod(fd, mode)
                    os.utime(fd, ns=(atime, mtime))
                else:
                    self._inherit(fd, parts)
            finally:
                os.close(fd)
        self._drop_cache()

    def _inherit(self, fd: int, parts: Parts) -> None:
        """An implied directory shows through the overlay as this layer's copy, so
        give it the metadata the layers below have (a /tmp implied as 0755 would
        break the root filesystem); with nothing below it stays root's 0755."""
        if self.below is None or any(parts[:i] in self._whited for i in range(1, len(parts) + 1)):
            return  # nothing below, or what is below is deleted by this layer
        if parts:
            found = self.below.lookup(parts)
            if found is None:
                return
            entry, sources = found
            try:
                if not stat.S_ISDIR(entry.st.st_mode):
                    return
                st, xattrs = entry.st, public_xattrs(entry.dir_fd, entry.name)
            finally:
                close_sources(sources)
        else:
            st, xattrs = os.fstat(self.below.fds[0]), public_xattrs(self.below.fds[0], b".")
        if self.privileged:
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        for key, value in xattrs.items():
            self._setxattr(fd, key, value)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
