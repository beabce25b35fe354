"""cowfs image pull/push against Debian's docker-registry on 127.0.0.1 (and
skopeo for interop): round trips, auth, TLS, a registry dying mid-pull.

    .venv/bin/python -m pytest -m slow tests/test_registry_slow.py
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cowfs.image.store import Store

from .imageutil import cowfs, sha
from .registryutil import (CuttingProxy, RegistryServer, example_layout, make_ca_and_cert,
                           needs_registry, needs_skopeo, running, skopeo)
from .test_registry import _tree

pytestmark = [pytest.mark.slow, needs_registry]
PLAIN = "--plain-http"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    with running(RegistryServer(tmp_path / "registry")) as server:
        yield server


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    example_layout(tmp_path / "oci", "v1", pad=200_000)
    return tmp_path / "oci"


def _manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    return next(d["digest"] for d in index["manifests"]
                if d["annotations"]["org.opencontainers.image.ref.name"] == tag)


def _state(store: Path) -> tuple:
    s = Store(str(store))
    return [r.name for r in s.images()], s.layer_ids()


def _same_image(a: Path, a_name: str, b: Path, b_name: str) -> None:
    """Same config, same diff_ids, same unpacked layer trees."""
    sa, sb = Store(str(a)), Store(str(b))
    ra, rb = sa.image(a_name), sb.image(b_name)
    assert (ra.id, ra.layers, ra.chain) == (rb.id, rb.layers, rb.chain)
    for c in ra.chain:
        assert _tree(Path(sa.layer_root(c))) == _tree(Path(sb.layer_root(c)))


def _push_layout(tmp_path: Path, layout: Path, dest: str, *extra: str) -> Path:
    store = tmp_path / "src-store"
    cowfs("image", "import", f"{layout}:v1", "--name", "local", "-q", store=store)
    cowfs("image", "push", "local", dest, PLAIN, *extra, store=store)
    return store


def test_push_pull_round_trip(registry: RegistryServer, layout: Path, tmp_path: Path) -> None:
    src = _push_layout(tmp_path, layout, f"{registry.host}/rt/app:v1")
    assert registry.manifest_digest("rt/app", "v1") == _manifest_digest(layout, "v1")
    dst = tmp_path / "dst-store"
    out = cowfs("image", "pull", PLAIN, f"{registry.host}/rt/app:v1", "--name", "pulled",
                store=dst).stdout
    assert f"manifest {_manifest_digest(layout, 'v1')[7:19]}" in out
    assert "3 layers, 3 downloaded" in out
    _same_image(dst, "pulled", src, "local")
    # and back again from the pulled copy: the same manifest, byte for byte
    cowfs("image", "push", "pulled", f"{registry.host}/rt/again:v1", PLAIN, store=dst)
    assert registry.manifest_digest("rt/again", "v1") == _manifest_digest(layout, "v1")


def test_chunked_push_and_mount(registry: RegistryServer, layout: Path, tmp_path: Path) -> None:
    _push_layout(tmp_path, layout, f"{registry.host}/ch/app:v1", "--chunk-size", "65536")
    assert registry.manifest_digest("ch/app", "v1") == _manifest_digest(layout, "v1")
    store = tmp_path / "store"
    cowfs("image", "pull", PLAIN, f"{registry.host}/ch/app:v1", "--name", "x", store=store)
    out = cowfs("image", "push", "x", f"{registry.host}/other/app:v2", PLAIN, store=store).stdout
    assert "4 blobs, 0 uploaded (0 B), 4 mounted" in out
    assert registry.manifest_digest("other/app", "v2") == _manifest_digest(layout, "v1")
    out = cowfs("image", "push", "x", f"{registry.host}/other/app:v3", PLAIN, store=store).stdout
    assert "4 already there" in out


def test_pull_twice_downloads_nothing(registry: RegistryServer, layout: Path,
                                      tmp_path: Path) -> None:
    _push_layout(tmp_path, layout, f"{registry.host}/tw/app:v1")
    store = tmp_path / "store"
    cowfs("image", "pull", PLAIN, f"{registry.host}/tw/app:v1", store=store)
    before = registry.blob_gets()
    out = cowfs("image", "pull", PLAIN, f"{registry.host}/tw/app:v1", "--name", "b",
                store=store).stdout
    assert registry.blob_gets() == before
    assert "0 downloaded (0 B), 3 already here" in out


@needs_skopeo
def test_skopeo_push_cowfs_pull(registry: RegistryServer, layout: Path, tmp_path: Path) -> None:
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
           f"docker://{registry.host}/sk/app:v1")
    cowfs("image", "pull", PLAIN, f"{registry.host}/sk/app:v1", "--name", "p",
          store=tmp_path / "a")
    cowfs("image", "import", f"{layout}:v1", "--name", "i", "-q", store=tmp_path / "b")
    _same_image(tmp_path / "a", "p", tmp_path / "b", "i")


@needs_skopeo
def test_cowfs_push_skopeo_pull(registry: RegistryServer, layout: Path, tmp_path: Path) -> None:
    _push_layout(tmp_path, layout, f"{registry.host}/cw/app:v1")
    out = tmp_path / "out"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/cw/app:v1",
           f"oci:{out}:v1")
    assert _manifest_digest(out, "v1") == _manifest_digest(layout, "v1")
    cowfs("image", "import", f"{out}:v1", "--name", "s", "-q", store=tmp_path / "b")
    _same_image(tmp_path / "b", "s", tmp_path / "src-store", "local")


def test_basic_auth_and_tls(tmp_path: Path, layout: Path) -> None:
    ca, cert, key = make_ca_and_cert(tmp_path / "tls")
    htpasswd = tmp_path / "htpasswd"
    bcrypt = shutil.which("htpasswd")
    if bcrypt is None:
        pytest.skip("htpasswd (apache2-utils) is not installed")
    subprocess.run([bcrypt, "-Bbc", str(htpasswd), "alice", "s3cret"], check=True,
                   capture_output=True)
    server = RegistryServer(tmp_path / "registry", tls=(cert, key), htpasswd=htpasswd)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    for f, pw in ((good, "s3cret"), (bad, "wrong")):
        f.write_text(json.dumps({"auths": {server.host: {
            "auth": base64.b64encode(f"alice:{pw}".encode()).decode()}}}))
    store = tmp_path / "store"
    cowfs("image", "import", f"{layout}:v1", "--name", "local", "-q", store=store)
    with running(server):
        dest = f"{server.host}/sec/app:v1"
        res = cowfs("image", "push", "local", dest, "--authfile", str(good), store=store,
                    check=False)
        assert res.returncode == 1 and "TLS failed" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        tls = ["--ca-file", str(ca)]
        res = cowfs("image", "push", "local", dest, *tls, "--authfile", str(tmp_path / "none"),
                    store=store, check=False)
        assert res.returncode == 1 and "wants a login" in res.stderr
        res = cowfs("image", "push", "local", dest, *tls, "--authfile", str(bad), store=store,
                    check=False)
        assert res.returncode == 1 and "authentication refused" in res.stderr
        cowfs("image", "push", "local", dest, *tls, "--authfile", str(good), store=store)
        other = tmp_path / "other"
        res = cowfs("image", "pull", dest, *tls, "--authfile", str(bad), store=other,
                    check=False)
        assert res.returncode == 1 and "authentication refused" in res.stderr
        assert _state(other) == ([], [])
        cowfs("image", "pull", dest, *tls, "--authfile", str(good), "--name", "p", store=other)
        _same_image(other, "p", store, "local")


def test_tampered_blob_refused(registry: RegistryServer, layout: Path, tmp_path: Path) -> None:
    _push_layout(tmp_path, layout, f"{registry.host}/tp/app:v1")
    manifest = json.loads((layout / "blobs/sha256" / _manifest_digest(layout, "v1")[7:])
                          .read_bytes())
    digest = manifest["layers"][1]["digest"]
    blob = registry.blob_file(digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    store = tmp_path / "store"
    res = cowfs("image", "pull", PLAIN, f"{registry.host}/tp/app:v1", store=store, check=False)
    assert res.returncode == 1
    assert f"layer blob {digest}: sha256 mismatch" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert _state(store) == ([], [])
    assert not os.path.exists(store / "blobs/sha256" / digest[7:])


def test_index_without_host_platform(registry: RegistryServer, layout: Path,
                                     tmp_path: Path) -> None:
    _push_layout(tmp_path, layout, f"{registry.host}/ix/app:v1")
    mdigest = _manifest_digest(layout, "v1")
    size = (layout / "blobs/sha256" / mdigest[7:]).stat().st_size
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                       "digest": mdigest, "size": size,
                                       "platform": {"os": "linux", "architecture": "s390x"}}]})
    r = httpx.put(f"http://{registry.host}/v2/ix/app/manifests/multi", content=index,
                  headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
    assert r.status_code == 201, r.text
    store = tmp_path / "store"
    res = cowfs("image", "pull", PLAIN, f"{registry.host}/ix/app:multi", store=store,
                check=False)
    assert res.returncode == 1 and "no manifest for linux/" in res.stderr
    assert "(the index has linux/s390x)" in res.stderr
    assert _state(store) == ([], [])
    out = cowfs("image", "pull", PLAIN, "--platform", "linux/s390x",
                f"{registry.host}/ix/app:multi", store=store).stdout
    assert f"manifest {mdigest[7:19]}" in out


def test_bad_references(registry: RegistryServer, layout: Path, tmp_path: Path) -> None:
    _push_layout(tmp_path, layout, f"{registry.host}/br/app:v1")
    store = tmp_path / "store"
    cases = [([f"{registry.host}/br/app:nope"], "no such tag on 127.0.0.1:"),
             ([f"{registry.host}/br/nothing:v1"], "no such repository"),
             ([f"{registry.host}/br/app@sha256:{'0' * 64}"], "no such tag or digest"),
             (["--retries", "0", "127.0.0.1:1/br/app:v1"], "registry unreachable")]
    for args, msg in cases:
        res = cowfs("image", "pull", PLAIN, *args, store=store, check=False)
        assert res.returncode == 1, res
        assert msg in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = cowfs("image", "pull", f"{registry.host}/br/app:v1", store=store, check=False)
    assert res.returncode == 1 and "TLS failed" in res.stderr and "--plain-http" in res.stderr
    res = cowfs("image", "pull", PLAIN, "Bad/Name", store=store, check=False)
    assert res.returncode == 2 and "invalid repository name" in res.stderr
    assert _state(store) == ([], [])


def _big_layout(tmp_path: Path) -> tuple[Path, list[str]]:
    example_layout(tmp_path / "big", "v1", pad=3_000_000)
    layout = tmp_path / "big"
    manifest = json.loads((layout / "blobs/sha256" / _manifest_digest(layout, "v1")[7:])
                          .read_bytes())
    return layout, [d["digest"] for d in manifest["layers"]]


def test_registry_stopped_mid_pull_then_restarted(registry: RegistryServer,
                                                   tmp_path: Path) -> None:
    """The registry dies in the second layer and comes back: the same pull's
    retries carry on where the data stopped (a Range request), no refetch."""
    layout, layers = _big_layout(tmp_path)
    _push_layout(tmp_path, layout, f"{registry.host}/mid/app:v1")
    restarted = threading.Event()

    def die_and_return() -> None:
        registry.stop()
        threading.Timer(1.0, lambda: (registry.start(), restarted.set())).start()
    proxy = CuttingProxy(registry.port, cut_after=4_500_000, on_cut=die_and_return)
    try:
        out = cowfs("image", "pull", PLAIN, "-j", "1", "--retries", "6",
                    f"{proxy.host}/mid/app:v1", "--name", "p", store=tmp_path / "s").stdout
    finally:
        proxy.close()
        restarted.wait(15)
    assert "3 layers, 3 downloaded" in out
    gets = [r for r in proxy.requests if r.startswith("GET") and "/blobs/sha256:" in r]
    assert [g for g in gets if layers[0] in g] == [f"GET /v2/mid/app/blobs/{layers[0]}"]
    resumed = [g for g in gets if layers[1] in g and "bytes=" in g]
    assert resumed, gets
    assert proxy.sent < 10_500_000  # ~9.1 MB of image: nothing fetched twice
    _same_image(tmp_path / "s", "p", tmp_path / "src-store", "local")


def test_registry_stopped_mid_pull_resumed_later(registry: RegistryServer,
                                                 tmp_path: Path) -> None:
    """The registry dies and stays down past the retries: the pull fails with
    one line and leaves no image or layer; the next pull fetches only what is
    missing."""
    layout, layers = _big_layout(tmp_path)
    _push_layout(tmp_path, layout, f"{registry.host}/mid/app:v1")
    proxy = CuttingProxy(registry.port, cut_after=4_500_000, on_cut=registry.stop)
    store = tmp_path / "s"
    try:
        res = cowfs("image", "pull", PLAIN, "-j", "1", "--retries", "1",
                    f"{proxy.host}/mid/app:v1", store=store, check=False)
        assert res.returncode == 1
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert _state(store) == ([], [])
        assert cowfs("image", "ls", store=store).stdout.strip().count("\n") == 0
        registry.start()
        cowfs("image", "pull", PLAIN, "-j", "1", f"{proxy.host}/mid/app:v1", "--name", "p",
              store=store)
    finally:
        proxy.close()
    gets = [r for r in proxy.requests if r.startswith("GET") and "/blobs/sha256:" in r]
    assert [g for g in gets if layers[0] in g] == [f"GET /v2/mid/app/blobs/{layers[0]}"]
    assert any(layers[1] in g and "bytes=" in g for g in gets), gets
    _same_image(store, "p", tmp_path / "src-store", "local")


def test_pushed_digests_match_sha(registry: RegistryServer, layout: Path, tmp_path: Path) -> None:
    """Every blob the registry holds after a push is the layout's blob."""
    _push_layout(tmp_path, layout, f"{registry.host}/dg/app:v1")
    manifest = json.loads((layout / "blobs/sha256" / _manifest_digest(layout, "v1")[7:])
                          .read_bytes())
    for d in [manifest["config"], *manifest["layers"]]:
        assert sha(registry.blob_file(d["digest"]).read_bytes()) == d["digest"]
