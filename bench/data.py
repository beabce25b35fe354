"""Identical test data for every backend: layer sets, big files, a source tarball.

Layout under ROOT (all of it scratch, removed at the end unless --keep-data):
  pool/f_small, pool/f_large        the big lower files (hard-linked into the layers)
  pool/plain_small, pool/plain_large private copies the plain backend may write to
  pool/src.tar                      the source-like tree for the job workload
  pool/rootfs-example/              --quick: a copy of /etc standing in for a rootfs
  (full run: the debootstrapped rootfs under /tmp/bench-helper/rootfs/, kept across runs)
  L<N>/<i>/                         layer i of the N-layer set (0 = top)
  manifest/L<N>-<sub>.txt           the paths a workload walks, one a line
  stamps/                           what has been generated already (with --keep-data)

Every lower file lives in exactly one layer, so the plain reference is the union of
the layers.  Directories are created in every layer that holds one of their files, so
they are merged directories in the overlays.
"""
from __future__ import annotations

import hashlib
import io
import sqlite3
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

from config import ROOTFS_CACHE, Config

SUBDIRS_BY_WORKLOAD = {
    "read": ["big"], "copyup": ["big"], "stat": ["stat"], "find": ["find"], "ls": ["ls"],
    "lookup": ["lk"], "small": ["del"], "job": ["src"], "memory": ["mem"], "cpu": ["cpu"],
    "mount": ["lk"], "git": ["git"], "sqlite": ["sq"], "rootfs": ["rootfs"],
}


class LayerSet:
    def __init__(self, root: Path, n: int) -> None:
        self.n = n
        self.root = root / f"L{n}"
        self.layers = [self.root / str(i) for i in range(n)]   # top first

    @property
    def bottom(self) -> Path:
        return self.layers[-1]


class Data:
    def __init__(self, root: Path, cfg: Config) -> None:
        self.root = root
        self.cfg = cfg
        self.pool = root / "pool"
        self.manifests = root / "manifest"
        self.stamps = root / "stamps"
        self.scratch = root / "scratch"
        self.big = {"f_small": self.pool / "f_small", "f_large": self.pool / "f_large"}
        self.plain_big = {"f_small": self.pool / "plain_small",
                          "f_large": self.pool / "plain_large"}
        self.src_tar = self.pool / "src.tar"
        self._src_files: list[tuple[str, bytes]] | None = None
        self.rootfs: Path | None = None
        self.apt_unavailable: str | None = "the rootfs was not prepared"

    def layerset(self, n: int) -> LayerSet:
        return LayerSet(self.root, n)

    def manifest(self, n: int, sub: str) -> Path:
        return self.manifests / f"L{n}-{sub}.txt"

    # -- bookkeeping -------------------------------------------------------------
    def _stamp(self, name: str, params: dict) -> tuple[Path, str]:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        return self.stamps / name, digest

    def _done(self, name: str, params: dict) -> bool:
        p, d = self._stamp(name, params)
        return p.exists() and p.read_text() == d

    def _mark(self, name: str, params: dict) -> None:
        p, d = self._stamp(name, params)
        p.write_text(d)

    # -- generation ---------------------------------------------------------------
    def prepare(self, needs: dict[int, set[str]], progress=None) -> None:
        """needs: layer count -> the subdirs (see SUBDIRS_BY_WORKLOAD) wanted there."""
        for d in (self.pool, self.manifests, self.stamps, self.scratch):
            d.mkdir(parents=True, exist_ok=True)
        if any("big" in subs for subs in needs.values()):
            self._note(progress, "big files")
            self._make_big_files()
        if any("src" in subs for subs in needs.values()):
            self._note(progress, "source tarball")
            self._make_src_tar()
        if any("rootfs" in subs for subs in needs.values()):
            self._note(progress, "rootfs")
            self._make_rootfs()
        for n, subs in sorted(needs.items()):
            ls = self.layerset(n)
            for sub in sorted(subs - {"rootfs"}):
                params = {"n": n, "sub": sub, "cfg": self._params(sub), "v": 2}
                name = f"L{n}-{sub}"
                if self._done(name, params):
                    continue
                self._note(progress, f"{n} layer(s): {sub}/")
                for layer in ls.layers:
                    shutil.rmtree(layer / sub, ignore_errors=True)
                    layer.mkdir(parents=True, exist_ok=True)
                getattr(self, f"_gen_{sub}")(ls)
                self._mark(name, params)
        try:
            subprocess.run(["sync"], timeout=300)
        except subprocess.TimeoutExpired:
            pass

    @staticmethod
    def _note(progress, what: str) -> None:
        if progress is not None:
            progress(f"generating data: {what}")

    def _params(self, sub: str) -> dict:
        c = self.cfg
        sizes = {"big": [c.big_small, c.big_large], "stat": c.stat_files,
                 "find": c.find_entries, "ls": c.bigdir, "lk": c.lookup_names,
                 "del": c.delete_files, "src": c.job_files, "mem": c.mem_entries,
                 "cpu": c.cpu_files, "git": c.git_files, "sq": 1}
        return {"size": sizes[sub], "seed": c.seed}

    def _rng(self, *salt) -> random.Random:
        return random.Random(f"{self.cfg.seed}:" + ":".join(map(str, salt)))

    @staticmethod
    def _write_big(path: Path, size: int, salt: str) -> None:
        if path.exists() and path.stat().st_size == size and \
                (path.stat().st_mode & 0o7777) == 0o644:
            return
        rnd = random.Random(salt)
        block = rnd.randbytes(1 << 20)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            left, i = size, 0
            while left > 0:
                chunk = block[: min(left, len(block))]
                f.write(i.to_bytes(8, "little") + chunk[8:])   # no two MiB alike
                left -= len(chunk)
                i += 1
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def _make_big_files(self) -> None:
        c = self.cfg
        self._write_big(self.big["f_small"], c.big_small, "small")
        self._write_big(self.big["f_large"], c.big_large, "large")
        self.restore_plain_big()

    def restore_plain_big(self) -> None:
        """Bring the plain backend's private copies back to the pool content."""
        for name, src in self.big.items():
            dst = self.plain_big[name]
            size = src.stat().st_size
            try:
                st = dst.stat()
            except FileNotFoundError:
                st = None
            if st is None or st.st_size < size:
                shutil.copyfile(src, dst)
            elif st.st_size > size:
                os.truncate(dst, size)
            os.chmod(dst, 0o644)
            for extra in dst.parent.glob(dst.name + ".cp"):
                extra.unlink()

    def _gen_big(self, ls: LayerSet) -> None:
        d = ls.bottom / "big"
        d.mkdir(parents=True, exist_ok=True)
        for name, src in self.big.items():
            os.link(src, d / name)

    def _spread(self, ls: LayerSet, sub: str, relpaths: list[str], content=b"",
                dirs: list[str] = ()) -> None:
        """Put each file into one random layer, creating its parents there."""
        rng = self._rng(ls.n, sub)
        made: set[tuple[int, str]] = set()
        for d in dirs:
            layer = rng.randrange(ls.n)
            (ls.layers[layer] / sub / d).mkdir(parents=True, exist_ok=True)
            made.add((layer, d))
        for rel in relpaths:
            layer = rng.randrange(ls.n)
            parent = os.path.dirname(rel)
            if (layer, parent) not in made:
                (ls.layers[layer] / sub / parent).mkdir(parents=True, exist_ok=True)
                made.add((layer, parent))
            data = content(rel) if callable(content) else content
            fd = os.open(ls.layers[layer] / sub / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if data:
                    os.write(fd, data)
            finally:
                os.close(fd)

    def _write_manifest(self, ls: LayerSet, sub: str, relpaths: list[str]) -> None:
        self.manifest(ls.n, sub).write_text("".join(f"{sub}/{r}\n" for r in relpaths))

    def _gen_stat(self, ls: LayerSet) -> None:
        n = self.cfg.stat_files
        ndirs = max(1, n // 100)
        rel = [f"d{i % ndirs:03d}/f{i:05d}" for i in range(n)]
        self._spread(ls, "stat", rel, b"x" * 64)
        self._write_manifest(ls, "stat", rel)

    def _gen_find(self, ls: LayerSet) -> None:
        # 3 levels of directories, ~100 files per leaf directory.
        n = self.cfg.find_entries
        leaves = max(1, n // 101)
        top = max(1, round(leaves ** 0.5))
        rel, dirs = [], []
        for leaf in range(leaves):
            d = f"a{leaf % top:02d}/b{leaf:03d}"
            dirs.append(d)
            rel += [f"{d}/src{j:03d}.c" for j in range(n // leaves - 1)]
        self._spread(ls, "find", rel, b"int x;\n", dirs=dirs)

    def _gen_ls(self, ls: LayerSet) -> None:
        rel = [f"dir/entry-{i:05d}" for i in range(self.cfg.bigdir)]
        self._spread(ls, "ls", rel)
        for layer in ls.layers:   # the directory is in every layer
            (layer / "ls" / "dir").mkdir(parents=True, exist_ok=True)

    def _gen_lk(self, ls: LayerSet) -> None:
        for i, layer in enumerate(ls.layers):
            d = layer / "lk"
            d.mkdir(parents=True, exist_ok=True)
            if layer != ls.bottom:
                for j in range(10):   # unrelated names in the upper layers
                    (d / f"x{i}-{j}").touch()
        for i in range(self.cfg.lookup_names):
            (ls.bottom / "lk" / f"b{i:05d}").touch()

    def _gen_del(self, ls: LayerSet) -> None:
        n = self.cfg.delete_files
        rel = [f"d{i % 20:02d}/victim{i:05d}" for i in range(n)]
        self._spread(ls, "del", rel, b"y" * 128)
        self._write_manifest(ls, "del", rel)

    def _gen_mem(self, ls: LayerSet) -> None:
        n = self.cfg.mem_entries
        per = 100
        ndirs = max(1, n // (per + 1))
        rel = [f"p{d // 32:02d}/d{d:04d}/e{j:02d}" for d in range(ndirs) for j in range(per)]
        self._spread(ls, "mem", rel)

    def _gen_cpu(self, ls: LayerSet) -> None:
        d = ls.bottom / "cpu"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(self.cfg.cpu_files):
            (d / f"f{i:05d}").write_bytes(b"c" * 64)
        for layer in ls.layers:   # a merged directory, as in the measurement
            (layer / "cpu").mkdir(parents=True, exist_ok=True)

    def _gen_git(self, ls: LayerSet) -> None:
        files = dict(self.src_files(self.cfg.git_files, "git"))
        self._spread(ls, "git", list(files), content=lambda rel: files[rel])

    def _gen_sq(self, ls: LayerSet) -> None:
        """A small database in the bottom layer: the first transaction copies it up."""
        d = ls.bottom / "sq"
        d.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(d / "bench.db")
        try:
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
            db.executemany("INSERT INTO t (body) VALUES (?)", [("seed" * 25,)] * 100)
            db.commit()
        finally:
            db.close()

    # -- the rootfs scenarios -----------------------------------------------------------
    def _make_rootfs(self) -> None:
        """The full run debootstraps a minbase bookworm once (kept in ROOTFS_CACHE) and
        downloads the apt-get scenario's packages into its apt cache, so the timed
        install is offline.  --quick (or no mirror) stands in a copy of /etc."""
        if self.cfg.rootfs == "debootstrap":
            why = self._debootstrap()
            if why is None:
                return
            self.apt_unavailable = why
        else:
            self.apt_unavailable = "not in a --quick run (needs the debootstrapped rootfs)"
        ex = self.pool / "rootfs-example"
        if not (ex / "etc").is_dir():
            ex.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", "/etc", str(ex / "etc")], check=True)
        self.rootfs = ex

    def _debootstrap(self) -> str | None:
        cache = Path(ROOTFS_CACHE)
        rootfs, tmp = cache / "bookworm", cache / "bookworm.tmp"
        if not (rootfs / "usr/bin/apt-get").exists():
            if shutil.which("debootstrap") is None:
                return "debootstrap is not installed"
            subprocess.run(["rm", "-rf", str(tmp)], check=True)
            cache.mkdir(parents=True, exist_ok=True)
            try:
                res = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(tmp),
                                      "http://deb.debian.org/debian"], capture_output=True,
                                     text=True, timeout=1200)
            except subprocess.TimeoutExpired:
                return "debootstrap did not finish within 20 min"
            if res.returncode != 0:
                tail = " | ".join(res.stdout.strip().splitlines()[-2:])
                return f"debootstrap failed (is deb.debian.org reachable?): {tail}"
            tmp.rename(rootfs)
        self.rootfs = rootfs
        pkg = self.cfg.apt_package
        archives = rootfs / "var/cache/apt/archives"
        if not list(archives.glob(f"{pkg}_*.deb")):
            res = subprocess.run(["chroot", str(rootfs), "apt-get", "install", "-y", "-q",
                                  "--download-only", pkg], capture_output=True, text=True,
                                 timeout=600, env={**os.environ,
                                                   "DEBIAN_FRONTEND": "noninteractive"})
            if res.returncode != 0:
                self.apt_unavailable = (f"cannot download {pkg} into the rootfs: "
                                        f"{res.stderr.strip()[-200:]}")
                return None
        self.apt_unavailable = None
        return None

    def build_plain_rootfs(self, dest: Path) -> None:
        """The plain reference for ls -lR: hard links to the rootfs (read only)."""
        if dest.exists():
            subprocess.run(["rm", "-rf", str(dest)], check=True)
        subprocess.run(["cp", "-al", str(self.rootfs), str(dest)], check=True)

    # -- the source-like tree -------------------------------------------------------
    def src_files(self, count: int | None = None, salt: str = "src") -> list[tuple[str, bytes]]:
        """A deterministic tree that looks like a C/Python project."""
        if count is not None:
            return self._source_tree(count, salt)
        if self._src_files is None:
            self._src_files = self._source_tree(self.cfg.job_files, salt)
        return self._src_files

    def _source_tree(self, n: int, salt: str) -> list[tuple[str, bytes]]:
        rng = self._rng(salt)
        words = ("int", "return", "static", "struct", "if", "else", "for", "while", "self",
                 "def", "import", "buffer", "length", "node", "value", "error", "const",
                 "char", "void", "size_t", "result", "layer", "inode", "entry", "path")
        files = []
        pkgs = [f"pkg{i:02d}" for i in range(max(2, n // 150))]
        for i in range(n):
            pkg = rng.choice(pkgs)
            depth = rng.randrange(0, 3)
            sub = "/".join(f"mod{rng.randrange(6)}" for _ in range(depth))
            ext = rng.choice([".c", ".h", ".py", ".py", ".md", ".txt", ".json"])
            rel = "/".join(x for x in (pkg, sub, f"file{i:05d}{ext}") if x)
            size = min(64 * 1024, int(rng.lognormvariate(8.0, 1.0)))
            out, total = [], 0
            while total < size:
                line = " ".join(rng.choice(words) for _ in range(rng.randrange(2, 12))) + ";\n"
                out.append(line)
                total += len(line)
            files.append((rel, "".join(out).encode()))
        return files

    def _make_src_tar(self) -> None:
        params = {"n": self.cfg.job_files, "seed": self.cfg.seed, "v": 1}
        if self.src_tar.exists() and self._done("src-tar", params):
            return
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            dirs = set()
            for rel, data in self.src_files():
                parts = rel.split("/")[:-1]
                for k in range(1, len(parts) + 1):
                    d = "/".join(parts[:k])
                    if d not in dirs:
                        dirs.add(d)
                        ti = tarfile.TarInfo(d)
                        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                        tar.addfile(ti)
                ti = tarfile.TarInfo(rel)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
                tar.addfile(ti, io.BytesIO(data))
        self.src_tar.write_bytes(buf.getvalue())
        self._mark("src-tar", params)

    def _gen_src(self, ls: LayerSet) -> None:
        files = dict(self.src_files())
        self._spread(ls, "src", list(files), content=lambda rel: files[rel])

    # -- used by the runner ------------------------------------------------------------
    def build_plain(self, n: int, subdirs: list[str], dest: Path) -> None:
        """The plain reference: the union of the layers, as hard links into a fresh dir.

        The big files are links to private copies, so writes never reach the layers.
        """
        if dest.exists():
            subprocess.run(["rm", "-rf", str(dest)], check=True)
        dest.mkdir(parents=True)
        ls = self.layerset(n)
        for sub in subdirs:
            if sub == "big":
                (dest / "big").mkdir()
                for name, src in self.plain_big.items():
                    os.link(src, dest / "big" / name)
                continue
            (dest / sub).mkdir()
            # Hard links, except where the workload writes files in place (sqlite).
            cp = "-a" if sub == "sq" else "-al"
            for layer in reversed(ls.layers):
                if (layer / sub).is_dir():
                    subprocess.run(["cp", cp, f"{layer / sub}/.", f"{dest / sub}/"],
                                   check=True)

    def prewarm(self, n: int, subdirs: list[str], lowers: list[Path] | None = None) -> None:
        """Walk the layers so every backend starts from the same warm lower caches."""
        if lowers is not None:
            for layer in lowers:
                for dirpath, dirnames, filenames in os.walk(layer):
                    for name in filenames:
                        os.lstat(os.path.join(dirpath, name))
            return
        ls = self.layerset(n)
        for layer in ls.layers:
            for sub in subdirs:
                if sub == "big":
                    continue
                for dirpath, dirnames, filenames in os.walk(layer / sub):
                    for name in filenames:
                        os.lstat(os.path.join(dirpath, name))

    def warm_file(self, path: Path) -> None:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(4 << 20)
            while f.readinto(buf):
                pass

    def cleanup(self) -> None:
        subprocess.run(["rm", "-rf", str(self.root)], check=False)
