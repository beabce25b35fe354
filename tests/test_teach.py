"""Seeing copy-on-write happen: events, counters, the control socket, trace and explain.

Events are checked against the operations that caused them, on real mounts of
the shipped example image; explain is checked against the merged view of a
mount (live) and against a read-only mount of the same layers (offline, on the
layer dirs and on the image imported into a store).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.overlay.events import COPY_UP, OPAQUE, REDIRECT, WHITEOUT, Event, EventBus
from cowfs.teach.client import EventCollector, MountRecord, mount_record, request
from cowfs.teach.explain import Explainer, split_path

from .imageutil import write_layout
from .mountutil import COWFS, cowfs_mount

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "image"
LOWERS = [EXAMPLE / "3-update", EXAMPLE / "2-app", EXAMPLE / "1-base"]


# -- the bus alone -----------------------------------------------------------------

class _Node:
    """Just what the bus reads of a core Node."""

    def __init__(self, name: bytes, parent: _Node | None, mode: int = stat.S_IFREG) -> None:
        self.name, self.parent, self.mode = name, parent, mode

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def test_bus_counts_without_listeners_and_builds_no_events():
    bus = EventBus()
    root = _Node(b"", None, stat.S_IFDIR)
    etc = _Node(b"etc", root, stat.S_IFDIR)
    bus.copied_up(_Node(b"hosts", etc), 3, 20, False, time.perf_counter_ns())
    bus.whiteout(etc, b"passwd")
    bus.request_counts = lambda: {"lookup": 2}
    c = bus.snapshot()
    assert (c.copy_ups, c.copy_up_bytes, c.whiteouts, c.requests) == (1, 20, 1, {"lookup": 2})
    sub = bus.subscribe(maxsize=2)
    for name in (b"a", b"b", b"c"):
        bus.whiteout(etc, name)
    got = [sub.get(0), sub.get(0), sub.get(0)]
    assert [e.path for e in got if e] == ["/etc/a", "/etc/b"] and sub.dropped == 1
    bus.unsubscribe(sub)
    assert bus.listeners == ()
    ev = got[0]
    assert Event.from_json(json.loads(json.dumps(ev.to_json()))) == ev


# -- live mounts -------------------------------------------------------------------

@pytest.fixture
def example_mount(tmp_path: Path) -> Iterator[Path]:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with cowfs_mount(LOWERS, upper, work, tmp_path / "mnt", "metacopy=on,redirect_dir=on") as m:
        yield m


class Listener(EventCollector):
    def __init__(self, mnt: Path) -> None:
        self.rec = mount_record(str(mnt))
        super().__init__(self.rec)


def test_parallel_writers_of_one_lower_file_make_one_copy_up(example_mount: Path):
    listener = Listener(example_mount)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            barrier.wait()
            with open(example_mount / "etc/hosts", "a") as f:
                f.write(f"10.0.0.{i} w{i}\n")
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # a marker after the writes: every event of the writes is in by then
    (example_mount / "marker").write_text("")
    events = listener.wait_for("create", "/marker")
    ups = [e for e in events if e.kind == COPY_UP and e.path == "/etc/hosts"]
    assert len(ups) == 1
    assert ups[0].layer == 3 and ups[0].bytes == len((LOWERS[2] / "etc/hosts").read_bytes())
    assert len((example_mount / "etc/hosts").read_text().splitlines()) == 9
    stats = request(listener.rec, "stats")
    assert stats["counters"]["copy_ups"] == sum(e.kind == COPY_UP for e in events) == 2  # + /etc
    assert stats["upper"]["files"] == 2


def test_a_whiteout_event_per_deleted_lower_name(example_mount: Path):
    listener = Listener(example_mount)
    m = example_mount
    (m / "scratch").write_text("upper only")
    (m / "scratch").unlink()                        # upper only: no whiteout
    (m / "bin/hello").unlink()                      # lower file
    (m / "etc/hostname").unlink()                   # top lower layer's file
    (m / "etc/os-release").rename(m / "etc/os-release.old")   # renamed away
    shutil.rmtree(m / "opt/app")                    # a lower dir and its files
    (m / "opt/app").mkdir()                         # replaced: opaque
    (m / "usr/share/doc").rename(m / "usr/share/docs")        # moved: redirect
    (m / "marker").write_text("")
    events = listener.wait_for("create", "/marker")
    whiteouts = sorted(e.path for e in events if e.kind == WHITEOUT)
    assert whiteouts == sorted(["/bin/hello", "/etc/hostname", "/etc/os-release",
                                "/opt/app/run.sh", "/opt/app/start", "/opt/app",
                                "/usr/share/doc"])
    assert [e.path for e in events if e.kind == OPAQUE] == ["/opt/app"]
    redirects = [e for e in events if e.kind == REDIRECT]
    assert [(e.path, e.detail) for e in redirects] == [("/usr/share/docs", "doc")]
    c = request(listener.rec, "stats")["counters"]
    assert (c["whiteouts"], c["opaque_dirs"], c["redirects"]) == (7, 1, 1)


def test_metadata_only_copy_up_event(example_mount: Path):
    listener = Listener(example_mount)
    os.chmod(example_mount / "etc/passwd", 0o600)
    ev = [e for e in listener.wait_for(COPY_UP, "/etc/passwd") if e.path == "/etc/passwd"]
    assert len(ev) == 1 and ev[0].metadata_only and ev[0].bytes == 0


def test_orphan_events_for_a_file_deleted_while_open(example_mount: Path):
    listener = Listener(example_mount)
    path = example_mount / "etc/scratch"
    with open(path, "w") as f:
        f.write("still here")
        path.unlink()
        listener.wait_for("orphan-kept", "/etc/scratch")
        f.write(" after the delete")
    # the kernel forgets the inode after the last close: the orphan goes
    listener.wait_for("orphan-deleted", "/etc/scratch")
    assert [e.path for e in listener.events if e.kind == WHITEOUT] == []


def _as_nobody(code: str) -> subprocess.CompletedProcess:
    prog = f"import os, socket, sys\nos.setgid(65534)\nos.setuid(65534)\n{code}"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          timeout=30)


def test_control_socket_refuses_other_users(example_mount: Path):
    rec = mount_record(str(example_mount))
    st = os.lstat(rec.control)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    # (a refused peer is told so at once, before it asks anything)
    connect = (f"s = socket.socket(socket.AF_UNIX)\ns.connect({rec.control!r})\n"
               "print(s.recv(4096).decode())")
    res = _as_nobody(connect)
    assert res.returncode != 0 and "PermissionError" in res.stderr
    # Past the file mode (as if it had been loosened), the peer check still says no.
    os.chmod(rec.control, 0o666)
    try:
        res = _as_nobody(connect)
    finally:
        os.chmod(rec.control, 0o600)
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert "error" in answer and "uid 65534" in answer["error"] and "counters" not in answer
    assert request(rec, "stats")["refused"] == 1


def test_trace_json_lines_parse(example_mount: Path):
    proc = subprocess.Popen([*COWFS, "trace", "--json", str(example_mount)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "tracing" in proc.stderr.readline()
        with open(example_mount / "etc/hosts", "a") as f:
            f.write("x\n")
        (example_mount / "bin/hello").unlink()
        msgs = []
        while not any(m.get("event", {}).get("kind") == WHITEOUT for m in msgs):
            msgs.append(json.loads(proc.stdout.readline()))
    finally:
        proc.terminate()
        proc.wait(10)
    kinds = [(m["event"]["kind"], m["event"]["path"]) for m in msgs]
    assert kinds == [(COPY_UP, "/etc"), (COPY_UP, "/etc/hosts"), (COPY_UP, "/bin"),
                     (WHITEOUT, "/bin/hello")]
    # the daemon lets go of a subscriber that hung up, even with no events to send
    rec = mount_record(str(example_mount))
    deadline = time.monotonic() + 10
    while request(rec, "stats")["listeners"]:
        assert time.monotonic() < deadline, "the listener outlived its client"
        time.sleep(0.1)


def test_stats_and_trace_name_the_problem_for_a_non_mount(tmp_path: Path):
    for cmd in ("trace", "stats"):
        res = subprocess.run([*COWFS, cmd, str(tmp_path)], capture_output=True, text=True)
        assert res.returncode == 2 and "is not a cowfs mount" in res.stderr


# -- explain against the merged view -------------------------------------------------

def _layer_paths(root: Path) -> set[str]:
    """Every path a layer names, whiteouts as the name they hide."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root).removeprefix(".").lstrip("/")
        for n in dirnames + filenames:
            if n.startswith(".wh..wh."):
                continue
            out.add((rel.rstrip("/") + "/" + n.removeprefix(".wh.")))
    return out


def _merged_paths(mnt: Path) -> set[str]:
    return _layer_paths(mnt)


def _kind(st: os.stat_result) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}[
        stat.S_IFMT(st.st_mode)]


def _check_agrees(ex: Explainer, roots: list[Path], mnt: Path) -> int:
    """explain says visible exactly for the merged view's paths, of the same kind
    and content as the mount shows; returns how many paths were checked."""
    paths = set().union(*(_layer_paths(r) for r in roots)) | _merged_paths(mnt) | {"/"}
    for p in sorted(paths):
        got = ex.explain(p)
        through = mnt / p.lstrip("/")
        shown = os.path.lexists(through)
        assert got.visible == shown, (p, got)
        if not shown:
            assert got.kind == "" and any(v.role == "hidden" or v.role == "hides"
                                          for v in got.layers) or \
                all(v.role == "absent" for v in got.layers), (p, got)
            continue
        st = os.lstat(through)
        assert got.kind == _kind(st), (p, got)
        serving = [v for v in got.layers if v.role == "serves"]
        assert len(serving) == 1 and serving[0].label == got.served_by, (p, got)
        v = serving[0]
        if got.metadata_only:   # the data is still the lower file's
            v = next(w for w in got.layers if w.label == got.data_from)
        real = Path(v.root) / v.at.lstrip("/")
        if got.kind == "file":
            assert real.read_bytes() == through.read_bytes(), (p, v)
        elif got.kind == "symlink":
            assert os.readlink(real) == os.readlink(through), (p, v)
    return len(paths)


def _change_everything(m: Path) -> None:
    with open(m / "etc/hosts", "a") as f:
        f.write("10.0.0.1 x\n")
    os.chmod(m / "etc/passwd", 0o600)
    (m / "bin/hello").unlink()
    shutil.rmtree(m / "opt/app")
    (m / "opt/app").mkdir()
    (m / "opt/app/new").write_text("new")
    (m / "usr/share/doc").rename(m / "usr/share/docs")
    (m / "var/cache/apt/new.bin").write_text("n")


def test_explain_agrees_with_the_live_merged_view(example_mount: Path):
    rec = mount_record(str(example_mount))
    _change_everything(example_mount)
    roots = [Path(rec.upperdir)] + [Path(p) for p in rec.lowerdirs]
    with Explainer([str(r) for r in roots], True) as ex:
        assert _check_agrees(ex, roots, example_mount) > 30
        passwd = ex.explain("/etc/passwd")
        assert passwd.metadata_only and passwd.data_from == "lower 3"
        hosts = ex.explain("/etc/hosts")
        assert hosts.copied_up and not hosts.metadata_only and hosts.copied_from == "lower 3"
        assert ex.explain("/usr/share/docs").redirect == "doc"
        gone = ex.explain("/bin/hello")
        assert [v.why for v in gone.layers if v.role == "hidden"] == \
            ["whiteout /bin/hello in upper"]
    # and through the command, on MNT/PATH
    res = subprocess.run([*COWFS, "explain", "--json", str(example_mount / "opt/app/run.sh"),
                          str(example_mount / "usr/share/docs/app/README")],
                         capture_output=True, text=True)
    assert res.returncode == 1, res.stderr   # one of the two is not in the merged view
    run_sh, readme = json.loads(res.stdout)
    assert not run_sh["visible"] and {v["why"] for v in run_sh["layers"] if v["why"]} == {
        "opaque directory /opt/app in upper"}
    assert readme["served_by"] == "lower 2" and \
        [v["at"] for v in readme["layers"] if v["role"] == "serves"] == ["/usr/share/doc/app/README"]


def test_explain_offline_on_layer_dirs_agrees_with_a_mount(tmp_path: Path):
    with cowfs_mount(LOWERS, None, None, tmp_path / "ro") as mnt, \
            Explainer([str(p) for p in LOWERS], False) as ex:
        assert _check_agrees(ex, LOWERS, mnt) > 20
        hidden = ex.explain("/var/cache/apt/srcpkgcache.bin")
        assert not hidden.visible and [v.why for v in hidden.layers if v.why] == [
            "opaque directory /var/cache/apt in lower 1"]
    res = subprocess.run([*COWFS, "which", *sum((["--lower", str(p)] for p in LOWERS), []),
                          "/etc/os-release"], capture_output=True, text=True)
    assert res.returncode == 0 and "served by lower 2" in res.stdout


def _layer_tar(root: Path) -> bytes:
    out = tmp = root.parent / (root.name + ".tar")
    with tarfile.open(tmp, "w") as t:
        for p in sorted(root.rglob("*")):
            t.add(p, arcname=str(p.relative_to(root)), recursive=False)
    data = out.read_bytes()
    out.unlink()
    return data


def test_explain_offline_on_a_store_image(tmp_path: Path):
    layers = [tmp_path / "l" / p.name for p in LOWERS]
    for src, dst in zip(LOWERS, layers):
        shutil.copytree(src, dst, symlinks=True)
    # OCI order is bottom first
    write_layout(tmp_path / "oci", "example", [_layer_tar(p) for p in reversed(layers)])
    store = tmp_path / "store"
    env = {**os.environ, "COWFS_STORE": str(store)}
    subprocess.run([*COWFS, "image", "import", "-q", f"{tmp_path / 'oci'}:example",
                    "--name", "example"], check=True, env=env, capture_output=True)
    with cowfs_mount(LOWERS, None, None, tmp_path / "ro") as mnt:
        paths = sorted(set().union(*(_layer_paths(r) for r in LOWERS)) | _merged_paths(mnt))
        res = subprocess.run([*COWFS, "explain", "--json", "--image", "example", *paths],
                             capture_output=True, text=True, env=env)
        assert res.stderr == ""
        for p, got in zip(paths, json.loads(res.stdout)):
            assert got["visible"] == os.path.lexists(mnt / p.lstrip("/")), (p, got)
            if got["visible"]:
                assert got["kind"] == _kind(os.lstat(mnt / p.lstrip("/"))), (p, got)


def test_explain_argument_errors(tmp_path: Path):
    for args, msg in ((["--upper", str(tmp_path), "/x"], "--upper needs"),
                      (["--lower", str(tmp_path / "nope"), "/x"], "is not a directory"),
                      ([str(tmp_path / "x")], "is not inside a cowfs mount")):
        res = subprocess.run([*COWFS, "explain", *args], capture_output=True, text=True)
        assert res.returncode == 2 and msg in res.stderr, res.stderr


def test_split_path():
    assert split_path("/a//b/./c/") == (b"a", b"b", b"c") and split_path("/") == ()


def test_record_names_the_socket(example_mount: Path):
    rec: MountRecord = mount_record(str(example_mount))
    assert request(rec, "info")["upperdir"] == rec.upperdir


# -- the full-screen view and the lesson, driven as a person would, in tmux ----------

class Tmux:
    def __init__(self, tmp_path: Path) -> None:
        self.base = ["tmux", "-S", str(tmp_path / "tmux.sock")]

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True,
                              text=True).stdout

    def screen(self, pane: str) -> str:
        return self("capture-pane", "-p", "-t", pane)

    def wait_for(self, pane: str, *texts: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(pane)
            if all(t in screen for t in texts):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{texts} not on the screen:\n{screen}")
            time.sleep(0.2)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/setup installs it)")
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.kill()


def _cowfs_cmd() -> str:
    return " ".join([*COWFS])


def test_watch_shows_the_layers_and_a_write_from_another_pane(example_mount: Path,
                                                             tmux: Tmux):
    tmux("new-session", "-d", "-x", "80", "-y", "24", "-s", "class",
         f"{_cowfs_cmd()} watch {example_mount}")
    tmux("set-option", "-t", "class", "remain-on-exit", "on")
    tmux.wait_for("class:0.0", "lower 3", "1-base", "lower 1", "3-update", "waiting for a change")
    tmux("split-window", "-d", "-t", "class:0", "-v", "bash --norc")
    tmux("send-keys", "-t", "class:0.1", f"echo 10.0.0.9 pupil >> {example_mount}/etc/hosts",
         "Enter")
    # the view's pane is half as high now: it still shows every layer and the event
    tmux.wait_for("class:0.0", "copy-up", "/etc/hosts", "from lower 3", "upper", "1-base",
                  "2-app", "3-update", "hosts")
    tmux("send-keys", "-t", "class:0.0", "q")
    deadline = time.monotonic() + 10
    while tmux("display-message", "-p", "-t", "class:0.0", "#{pane_dead}").strip() != "1":
        assert time.monotonic() < deadline, "q did not end the view"
        time.sleep(0.1)


def test_lesson_steps_with_pause(tmp_path: Path, tmux: Tmux):
    tmux("new-session", "-d", "-x", "100", "-y", "50", "-s", "lesson",
         f"TMPDIR={tmp_path} {_cowfs_cmd()} lesson --pause; sleep 30")
    try:
        tmux.wait_for("lesson", "1/9", "Layers, stacked read-only", "Enter: next step")
        tmux("send-keys", "-t", "lesson", "Enter")
        tmux.wait_for("lesson", "2/9", "served by lower 2")
        tmux("send-keys", "-t", "lesson", "Enter")
        screen = tmux.wait_for("lesson", "3/9", "copy-up", "/etc/hosts  from lower 3",
                               "+ /etc/hosts  file")
        assert "4/9" not in screen   # it waits
        for _ in range(6):
            tmux("send-keys", "-t", "lesson", "Enter")
            time.sleep(0.3)
        tmux.wait_for("lesson", "9/9", "Unmounted", timeout=60)
    finally:
        tmux.kill()
        for mnt in tmp_path.glob("cowfs-lesson-*/merged"):
            from .mountutil import unmount
            unmount(mnt)
    assert not list(tmp_path.glob("cowfs-lesson-*"))
