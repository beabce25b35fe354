"""Registry pull/push logic without a server: references, platforms, auth
challenges and files, and whole pulls against an in-process fake registry
(httpx.MockTransport) for bearer tokens, retries, resume and bad answers."""
from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cowfs.image.errors import ImageError
from cowfs.image.oci import MT_DOCKER_LIST, MT_OCI_INDEX, MT_OCI_MANIFEST, open_source
from cowfs.image.registry import (Arrival, BlobCache, Platform, RegistryOptions, parse_platform,
                                  parse_reference, pull, push, select_manifest)
from cowfs.image.registry_auth import auth_files, find_credentials, parse_www_authenticate
from cowfs.image.store import Store
from cowfs.overlay.params import UsageError

from .imageutil import cowfs, sha, snapshot, write_layout
from .registryutil import example_layers, example_layout

D = "sha256:" + "ab" * 32


# -- references --------------------------------------------------------------------

@pytest.mark.parametrize("spec,want", [
    ("alpine", ("docker.io", "library/alpine", "latest", None)),
    ("user/app:1.2", ("docker.io", "user/app", "1.2", None)),
    ("localhost/app", ("localhost", "app", "latest", None)),
    ("127.0.0.1:5000/ns/app:v1", ("127.0.0.1:5000", "ns/app", "v1", None)),
    ("reg.example.com/a/b/c", ("reg.example.com", "a/b/c", "latest", None)),
    (f"reg.example.com/app@{D}", ("reg.example.com", "app", None, D)),
    (f"reg.example.com:443/app:t@{D}", ("reg.example.com:443", "app", "t", D)),
    ("my-reg:5000/app_x/y-z.w:T_1", ("my-reg:5000", "app_x/y-z.w", "T_1", None)),
])
def test_parse_reference(spec: str, want: tuple) -> None:
    ref = parse_reference(spec)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == want
    assert parse_reference(str(ref)) == ref


def test_docker_hub_endpoint() -> None:
    assert parse_reference("alpine").endpoint == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:5000/a").endpoint == "127.0.0.1:5000"


@pytest.mark.parametrize("spec", ["Upper/app", "app:bad tag", "app:-x", "app@md5:abc",
                                  f"app@sha256:{'0' * 63}", "reg:5000/", "a//b", "app:"])
def test_bad_reference(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(spec)


# -- platforms -----------------------------------------------------------------------

INDEX = [
    {"digest": "sha256:" + "01" * 32, "platform": {"os": "linux", "architecture": "amd64"}},
    {"digest": "sha256:" + "02" * 32,
     "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
    {"digest": "sha256:" + "03" * 32,
     "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
    {"digest": "sha256:" + "04" * 32,
     "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    {"digest": "sha256:" + "05" * 32, "platform": {"os": "windows", "architecture": "amd64"}},
    {"digest": "sha256:" + "06" * 32, "platform": {"os": "unknown", "architecture": "unknown"},
     "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
]


@pytest.mark.parametrize("want,pick", [
    ("linux/amd64", "01"), ("linux/arm", "03"), ("linux/arm/v6", "02"), ("linux/arm/v7", "03"),
    ("linux/arm64", "04"), ("linux/arm64/v8", "04"), ("windows/amd64", "05"),
    ("linux/riscv64", None), ("linux/arm/v5", None), ("unknown/unknown", None),
])
def test_select_manifest(want: str, pick: str | None) -> None:
    got = select_manifest(INDEX, parse_platform(want))
    assert (got["digest"][7:9] if got else None) == pick


def test_select_prefers_named_platform_over_unnamed() -> None:
    unnamed = {"digest": "sha256:" + "07" * 32}
    assert select_manifest([unnamed, INDEX[0]], Platform("linux", "amd64")) is INDEX[0]
    assert select_manifest([unnamed], Platform("linux", "amd64")) is unnamed


@pytest.mark.parametrize("spec", ["linux", "linux/", "/amd64", "a/b/c/d"])
def test_bad_platform(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_platform(spec)


# -- WWW-Authenticate and auth files ---------------------------------------------------

def test_parse_bearer_challenge_with_commas_in_scope() -> None:
    [ch] = parse_www_authenticate(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push"')
    assert ch.scheme == "bearer"
    assert ch.params == {"realm": "https://auth.example.com/token",
                         "service": "registry.example.com", "scope": "repository:a/b:pull,push"}


def test_parse_several_challenges_and_escapes() -> None:
    chs = parse_www_authenticate('Basic realm="say \\"hi\\"", Bearer realm=https://t/x,error=x')
    assert [(c.scheme, c.params) for c in chs] == [
        ("basic", {"realm": 'say "hi"'}), ("bearer", {"realm": "https://t/x", "error": "x"})]
    assert parse_www_authenticate("") == []


def _auth(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_credentials_lookup(tmp_path: Path) -> None:
    containers = tmp_path / "auth.json"
    containers.write_text(json.dumps({"auths": {
        "reg.example.com/team": _auth("team", "t"), "reg.example.com": _auth("any", "a"),
        "helper.example.com": {}}}))
    docker = tmp_path / "config.json"
    docker.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": _auth("hub", "h"), "helper.example.com": _auth("d", "d"),
        "other.example.com:5000": {"username": "u", "password": "p"}}}))
    files = [str(tmp_path / "missing.json"), str(containers), str(docker)]

    def who(registry: str, repo: str) -> str | None:
        c = find_credentials(registry, repo, files)
        return f"{c.username}:{c.password}" if c else None
    assert who("reg.example.com", "team/app") == "team:t"       # most specific entry
    assert who("reg.example.com", "teamx/app") == "any:a"
    assert who("docker.io", "library/alpine") == "hub:h"       # docker's v1 key
    assert who("helper.example.com", "x") == "d:d"              # an empty entry is skipped
    assert who("other.example.com:5000", "x") == "u:p"
    assert who("nowhere.example.com", "x") is None


def test_bad_auth_entry(tmp_path: Path) -> None:
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"auths": {"r.example.com": {"auth": "bm9jb2xvbg=="}}}))  # "nocolon"
    with pytest.raises(ImageError, match="not base64 of user:password"):
        find_credentials("r.example.com", "x", [str(f)])
    f.write_text("{not json")
    with pytest.raises(ImageError, match="cannot read the auth file"):
        find_credentials("r.example.com", "x", [str(f)])


def test_auth_file_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", "/a/auth.json")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", "/d")
    assert auth_files() == ["/a/auth.json", "/run/user/7/containers/auth.json",
                            f"{tmp_path}/.config/containers/auth.json", "/d/config.json"]
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("DOCKER_CONFIG")
    assert auth_files() == [f"{tmp_path}/.config/containers/auth.json",
                            f"{tmp_path}/.docker/config.json"]


# -- a fake registry in process --------------------------------------------------------

@dataclass
class FakeRegistry:
    """The distribution API's pull and push endpoints over dicts, with switches
    for bearer auth, failures and tampering; records every request."""
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)   # ref -> (data, type)
    token_user: tuple[str, str] | None = None      # bearer tokens, for this user:password
    fail_5xx: int = 0                              # the first N requests answer 503
    break_blob: dict[str, int] = field(default_factory=dict)  # digest -> cut after N bytes, once
    ranges: bool = True
    lose_patch_answer: int = 0                     # store the Nth PATCH, then answer 503
    requests: list[str] = field(default_factory=list)
    uploads: dict[str, bytearray] = field(default_factory=dict)

    def add_layout(self, layout: Path, repo: str, tag: str) -> None:
        for p in (layout / "blobs" / "sha256").iterdir():
            self.blobs["sha256:" + p.name] = p.read_bytes()
        index = json.loads((layout / "index.json").read_text())
        for d in index["manifests"]:
            if d["annotations"]["org.opencontainers.image.ref.name"] == tag:
                data = self.blobs[d["digest"]]
                self.manifests[f"{repo}:{tag}"] = (data, d["mediaType"])
                self.manifests[f"{repo}:{d['digest']}"] = (data, d["mediaType"])

    def blob_gets(self) -> list[str]:
        return [r for r in self.requests if r.startswith("GET") and "/blobs/" in r]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path} "
                             f"{request.headers.get('range', '')}".strip())
        if request.url.path == "/token":
            want = "Basic " + base64.b64encode(":".join(self.token_user or ()).encode()).decode()
            if request.headers.get("authorization") != want:
                return httpx.Response(401)
            scope = request.url.params.get_list("scope")
            return httpx.Response(200, json={"token": "tok " + " ".join(scope)})
        if self.fail_5xx:
            self.fail_5xx -= 1
            return httpx.Response(503)
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/(.+)", request.url.path)
        if self.token_user is not None:
            repo = m.group(1) if m else "x"
            if not request.headers.get("authorization", "").startswith(
                    f"Bearer tok repository:{repo}:"):
                return httpx.Response(401, headers={"WWW-Authenticate": (
                    f'Bearer realm="http://fake/token",service="fake",'
                    f'scope="repository:{repo}:pull"')})
        if m and m.group(3) == "uploads/":
            if request.method == "POST":
                uid = str(len(self.uploads))
                self.uploads[uid] = bytearray()
                return httpx.Response(202, headers={"Location": f"/upload/{uid}?_state=s"})
        if request.url.path.startswith("/upload/"):
            uid = request.url.path.rsplit("/", 1)[1]
            assert request.url.params.get("_state") == "s"
            here = {"Location": f"/upload/{uid}?_state=s"}
            if request.method == "GET":
                return httpx.Response(204, headers={
                    **here, "Range": f"0-{len(self.uploads[uid]) - 1}"})
            if request.method == "PATCH":
                start = int(request.headers["content-range"].split("-")[0])
                if start != len(self.uploads[uid]):
                    return httpx.Response(416)
                self.uploads[uid] += request.read()
                patches = sum(r.startswith("PATCH") for r in self.requests)
                if patches == self.lose_patch_answer:
                    return httpx.Response(503)
                return httpx.Response(202, headers=here)
            self.uploads[uid] += request.read()
            digest = request.url.params["digest"]
            if sha(bytes(self.uploads[uid])) != digest:
                return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID"}]})
            self.blobs[digest] = bytes(self.uploads[uid])
            return httpx.Response(201)
        t = re.fullmatch(r"/v2/(.+)/tags/list", request.url.path)
        if t:
            tags = sorted(k.split(":", 1)[1] for k in self.manifests
                          if k.startswith(t.group(1) + ":") and "sha256:" not in k)
            return httpx.Response(200, json={"name": t.group(1), "tags": tags}) if tags else \
                httpx.Response(404, json={"errors": [{"code": "NAME_UNKNOWN"}]})
        if not m:
            return httpx.Response(404)
        repo, kind, ref = m.groups()
        if kind == "manifests":
            if request.method == "PUT":
                data = request.read()
                self.manifests[f"{repo}:{ref}"] = (data, request.headers["content-type"])
                return httpx.Response(201, headers={"Docker-Content-Digest": sha(data)})
            if f"{repo}:{ref}" not in self.manifests:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            data, mt = self.manifests[f"{repo}:{ref}"]
            return httpx.Response(200, content=data, headers={
                "Content-Type": mt, "Docker-Content-Digest": sha(data)})
        if ref not in self.blobs:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        data = self.blobs[ref]
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        start = 0
        rng = request.headers.get("range")
        if rng and self.ranges:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
        body = data[start:]
        status = 206 if start else 200
        if ref in self.break_blob:
            return httpx.Response(status, stream=_Broken(body, self.break_blob.pop(ref)))
        return httpx.Response(status, content=body)


class _Broken(httpx.SyncByteStream):
    """A body that breaks off after n bytes, as a reset connection does."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.n = data, n

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[:self.n]
        raise httpx.ReadError("connection reset by peer")


OPTS = RegistryOptions(plain_http=True, retries=2, jobs=2, progress=False)


@pytest.fixture
def fake(tmp_path: Path) -> FakeRegistry:
    reg = FakeRegistry()
    example_layout(tmp_path / "oci", "v1", pad=300_000)
    reg.add_layout(tmp_path / "oci", "ns/app", "v1")
    return reg


def _pull(store: Store, fake: FakeRegistry, spec: str = "fake.test/ns/app:v1",
          opts: RegistryOptions = OPTS, **kw: object) -> object:
    return pull(store, spec, opts, transport=httpx.MockTransport(fake), **kw)  # type: ignore


def _store_state(store: Store) -> tuple:
    return (store.images(), store.layer_ids(),
            sorted(os.listdir(BlobCache(store).dir)) if os.path.isdir(BlobCache(store).dir)
            else [])


def test_pull_equals_import(fake: FakeRegistry, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    summary = _pull(store, fake)
    assert "3 layers, 3 downloaded" in str(summary)
    ref = Store(str(tmp_path / "ref"))
    ref.import_image(open_source(str(tmp_path / "oci") + ":v1"), "ref", progress=False)
    [got], [want] = store.images(), ref.images()
    assert (got.layers, got.chain, got.id) == (want.layers, want.chain, want.id)
    assert (got.kind, got.source) == ("registry", f"fake.test/ns/app@{summary.manifest_digest}")
    for c in got.chain:
        assert _tree(Path(store.layer_root(c))) == _tree(Path(ref.layer_root(c)))


def _tree(root: Path) -> dict:
    """snapshot() but for whiteouts' mtimes, which are when they were unpacked."""
    return {p: tuple(kv for kv in rec if not (kv[0] == "mtime" and ("mode", "0o20000") in rec))
            for p, rec in snapshot(root).items()}


def test_pull_twice_fetches_no_blob(fake: FakeRegistry, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    _pull(store, fake)
    n = len(fake.blob_gets())
    summary = _pull(store, fake, name="again")
    assert fake.blob_gets()[n:] == []
    assert "0 downloaded" in str(summary)
    assert {r.name for r in store.images()} == {"fake.test/ns/app:v1", "again"}


def _layer_tars(fake: FakeRegistry) -> list[bytes]:
    manifest = json.loads(fake.manifests["ns/app:v1"][0])
    return [gzip.decompress(fake.blobs[d["digest"]]) for d in manifest["layers"]]


def test_pull_skips_layers_the_store_has(fake: FakeRegistry, tmp_path: Path) -> None:
    """Layers imported before (store keys: chain IDs) are not downloaded again,
    even with no blob kept: only the manifest and the config are fetched."""
    store = Store(str(tmp_path / "store"))
    store.import_image(open_source(str(tmp_path / "oci") + ":v1"), "local", progress=False)
    summary = _pull(store, fake)
    config = json.loads(fake.manifests["ns/app:v1"][0])["config"]["digest"]
    assert fake.blob_gets() == [f"GET /v2/ns/app/blobs/{config}"]
    assert "0 downloaded" in str(summary)
    assert store.image("fake.test/ns/app:v1").chain == store.image("local").chain


def test_pull_fetches_a_layer_stored_over_another_base(fake: FakeRegistry,
                                                       tmp_path: Path) -> None:
    """The image's second layer is in the store, but as the bottom layer of
    another image: over this image's first layer it is another store layer,
    and its blob must be downloaded."""
    tars = _layer_tars(fake)
    write_layout(tmp_path / "other", "b", [tars[1]])
    store = Store(str(tmp_path / "store"))
    store.import_image(open_source(str(tmp_path / "other") + ":b"), "b", progress=False)
    assert store.has_layer(sha(tars[1]))
    summary = _pull(store, fake)
    assert "3 layers, 3 downloaded" in str(summary)
    rec = store.image("fake.test/ns/app:v1")
    assert rec.layers == [sha(t) for t in tars] and sha(tars[1]) not in rec.chain


def test_commit_image_on_pulled_base(fake: FakeRegistry, tmp_path: Path) -> None:
    """commit --image over a pulled image writes its layers from the blobs the
    pull kept (linked, not copied), plus the new layer."""
    st = tmp_path / "store"
    store = Store(str(st))
    _pull(store, fake)
    rec = store.image("fake.test/ns/app:v1")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "added").write_bytes(b"committed")
    lowers = [a for d in store.lower_dirs(rec) for a in ("--lower", d)]
    cowfs("commit", str(upper), *lowers, "--image", f"{tmp_path}/out:c", store=st)
    pulled = json.loads(fake.manifests["ns/app:v1"][0])
    src = open_source(f"{tmp_path}/out:c")
    assert [d["digest"] for d in src.manifest["layers"][:3]] == \
        [d["digest"] for d in pulled["layers"]]
    assert [lr.diff_id for lr in src.layers[:3]] == rec.layers
    for d in pulled["layers"]:
        assert os.stat(BlobCache(store).path(d["digest"])).st_nlink == 2
    again = Store(str(tmp_path / "again"))
    again.import_image(src, "c", progress=False)
    top = Path(again.lower_dirs(again.image("c"))[0])
    assert (top / "etc" / "added").read_bytes() == b"committed"
    # A kept blob gone (pruned by hand): the commit says which, and what to do.
    os.unlink(BlobCache(store).path(pulled["layers"][0]["digest"]))
    res = cowfs("commit", str(upper), *lowers, "--image", f"{tmp_path}/out2:c", store=st,
                check=False)
    assert res.returncode == 1
    assert f"pull fake.test/ns/app@{sha(fake.manifests['ns/app:v1'][0])} again" in res.stderr


def test_bearer_token(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.token_user = ("alice", "s3cret")
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {"fake.test": _auth("alice", "s3cret")}}))
    store = Store(str(tmp_path / "store"))
    _pull(store, fake, opts=RegistryOptions(**{**OPTS.__dict__, "auth_file": str(auth)}))
    assert len(store.images()) == 1
    # one token per scope: not one token request per blob
    assert sum(r.startswith("GET /token") for r in fake.requests) == 1


def test_bearer_token_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.token_user = ("alice", "s3cret")
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {"fake.test": _auth("alice", "wrong")}}))
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ImageError, match="authentication refused by http://fake/token"):
        _pull(store, fake, opts=RegistryOptions(**{**OPTS.__dict__, "auth_file": str(auth)}))
    assert store.images() == []


def test_5xx_retried(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.fail_5xx = 2
    store = Store(str(tmp_path / "store"))
    _pull(store, fake)
    assert len(store.images()) == 1
    fake.fail_5xx = 10
    with pytest.raises(ImageError, match="HTTP 503"):
        _pull(store, fake, opts=RegistryOptions(**{**OPTS.__dict__, "retries": 1}), name="x")


@pytest.mark.parametrize("ranges", [True, False])
def test_broken_download_resumes(fake: FakeRegistry, tmp_path: Path, ranges: bool) -> None:
    manifest = json.loads(fake.manifests["ns/app:v1"][0])
    big = manifest["layers"][1]["digest"]
    fake.break_blob[big] = 100_000
    fake.ranges = ranges
    store = Store(str(tmp_path / "store"))
    _pull(store, fake)
    gets = [r for r in fake.blob_gets() if big in r]
    assert gets == [f"GET /v2/ns/app/blobs/{big}",
                    f"GET /v2/ns/app/blobs/{big} bytes=100000-"]
    assert len(store.images()) == 1


def test_interrupted_pull_resumes(fake: FakeRegistry, tmp_path: Path) -> None:
    manifest = json.loads(fake.manifests["ns/app:v1"][0])
    big = manifest["layers"][2]["digest"]
    store = Store(str(tmp_path / "store"))
    fake.break_blob[big] = 50_000
    opts = RegistryOptions(**{**OPTS.__dict__, "retries": 0, "jobs": 1})
    with pytest.raises(ImageError, match="download broke off at byte 50000"):
        _pull(store, fake, opts=opts)
    assert store.images() == [] and store.layer_ids() == []
    done = len(fake.blob_gets())
    _pull(store, fake, opts=opts)
    # the finished blobs are not fetched again, the broken one continues
    assert fake.blob_gets()[done:] == [f"GET /v2/ns/app/blobs/{big} bytes=50000-"]


def test_bad_partial_download_refetched(fake: FakeRegistry, tmp_path: Path) -> None:
    """A partial download that is not the blob's start (a disk went bad, the
    registry's blob changed) is fetched whole once more, not trusted."""
    manifest = json.loads(fake.manifests["ns/app:v1"][0])
    d = manifest["layers"][0]["digest"]
    store = Store(str(tmp_path / "store"))
    cache = BlobCache(store)
    cache.ensure()
    (Path(cache.incoming_dir) / d[7:]).write_bytes(b"garbage" * 1000)
    _pull(store, fake)
    assert [r for r in fake.blob_gets() if d in r] == [
        f"GET /v2/ns/app/blobs/{d} bytes=7000-", f"GET /v2/ns/app/blobs/{d}"]
    assert cache.read(d) == fake.blobs[d]


def test_tampered_blob(fake: FakeRegistry, tmp_path: Path) -> None:
    manifest = json.loads(fake.manifests["ns/app:v1"][0])
    d = manifest["layers"][0]["digest"]
    fake.blobs[d] = fake.blobs[d][:-5] + b"XXXXX"
    store = Store(str(tmp_path / "store"))
    before = _store_state(store)
    with pytest.raises(ImageError, match=f"layer blob {d}: sha256 mismatch"):
        _pull(store, fake)
    assert _store_state(store)[:2] == before[:2]
    assert d[7:] not in _store_state(store)[2]
    assert d[7:] not in os.listdir(BlobCache(store).incoming_dir)


def test_follower_of_a_discarded_download_gets_its_error(tmp_path: Path) -> None:
    """A download that failed and discarded its file before the unpacker's first
    read: the reader waits for the download's error instead of failing to open
    a file that is gone."""
    arrival = Arrival(str(tmp_path / "cache" / "blob"))
    arrival.started(str(tmp_path / "incoming" / "blob"), 10)  # neither file exists
    told = threading.Timer(0.2, arrival.finished, [ImageError("layer blob x: sha256 mismatch")])
    told.start()
    try:
        with pytest.raises(ImageError, match="sha256 mismatch"):
            arrival.reader().read()
    finally:
        told.join()


def test_tampered_manifest(fake: FakeRegistry, tmp_path: Path) -> None:
    data, mt = fake.manifests["ns/app:v1"]
    digest = sha(data)
    fake.manifests[f"ns/app:{digest}"] = (data.replace(b'"size"', b' "size"', 1), mt)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ImageError, match="manifest: sha256 mismatch"):
        _pull(store, fake, f"fake.test/ns/app@{digest}")
    assert store.images() == []


def _index(fake: FakeRegistry, platforms: list[dict], mt: str = MT_OCI_INDEX) -> None:
    data, _ = fake.manifests["ns/app:v1"]
    index = json.dumps({"schemaVersion": 2, "mediaType": mt, "manifests": [
        {"mediaType": MT_OCI_MANIFEST, "digest": sha(data), "size": len(data), "platform": p}
        for p in platforms]}).encode()
    fake.manifests["ns/app:multi"] = (index, mt)


@pytest.mark.parametrize("mt", [MT_OCI_INDEX, MT_DOCKER_LIST])
def test_index_platform(fake: FakeRegistry, tmp_path: Path, mt: str) -> None:
    _index(fake, [{"os": "linux", "architecture": "s390x"}], mt)
    store = Store(str(tmp_path / "store"))
    opts = RegistryOptions(**{**OPTS.__dict__, "platform": Platform("linux", "s390x")})
    _pull(store, fake, "fake.test/ns/app:multi", opts=opts)
    assert len(store.images()) == 1


def test_index_without_platform(fake: FakeRegistry, tmp_path: Path) -> None:
    _index(fake, [{"os": "linux", "architecture": "s390x"},
                  {"os": "linux", "architecture": "arm", "variant": "v6"}])
    store = Store(str(tmp_path / "store"))
    opts = RegistryOptions(**{**OPTS.__dict__, "platform": Platform("linux", "riscv64")})
    with pytest.raises(ImageError, match=r"no manifest for linux/riscv64 \(the index has "
                                         r"linux/arm/v6, linux/s390x\)"):
        _pull(store, fake, "fake.test/ns/app:multi", opts=opts)
    assert store.images() == []


@pytest.mark.parametrize("doc,mt,msg", [
    ({"schemaVersion": 1, "fsLayers": []},
     "application/vnd.docker.distribution.manifest.v1+prettyjws", "Docker schema 1"),
    ({"schemaVersion": 2, "mediaType": "application/vnd.example+json"},
     "application/vnd.example+json", "unsupported manifest type"),
    ({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
      "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": D, "size": 1},
      "layers": []}, MT_OCI_MANIFEST, "not a container image"),
    ({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 1},
      "layers": [{"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                  "digest": D, "size": 1}]}, MT_OCI_MANIFEST, "unsupported layer type"),
])
def test_unsupported_manifests(fake: FakeRegistry, tmp_path: Path, doc: dict, mt: str,
                               msg: str) -> None:
    fake.manifests["ns/app:odd"] = (json.dumps(doc).encode(), mt)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ImageError, match=msg):
        _pull(store, fake, "fake.test/ns/app:odd")
    assert store.images() == []


def test_unknown_tag_and_repo(fake: FakeRegistry, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ImageError, match=r"ns/app:nope: no such tag on fake.test \(tags: v1\)"):
        _pull(store, fake, "fake.test/ns/app:nope")
    with pytest.raises(ImageError, match="other/app:v1: no such repository on fake.test"):
        _pull(store, fake, "fake.test/other/app:v1")
    assert store.images() == []


@pytest.mark.parametrize("chunk", [None, 100_000])
def test_push_round_trip(fake: FakeRegistry, tmp_path: Path, chunk: int | None) -> None:
    store = Store(str(tmp_path / "store"))
    _pull(store, fake)
    opts = RegistryOptions(**{**OPTS.__dict__, "chunk_size": chunk})
    dest = FakeRegistry()
    transport = httpx.MockTransport(dest)
    pushed = push(store, "fake.test/ns/app:v1", "fake.test/other/app:v2", opts, transport)
    assert pushed.manifest_digest == sha(fake.manifests["ns/app:v1"][0])
    assert dest.manifests["other/app:v2"] == fake.manifests["ns/app:v1"]
    assert dest.blobs == {d: fake.blobs[d] for d in dest.blobs} and len(dest.blobs) == 4
    patches = [r for r in dest.requests if r.startswith("PATCH")]
    assert len(patches) == (sum(-(-len(b) // chunk) for b in dest.blobs.values())
                            if chunk else 0)
    # a second push finds every blob there (HEAD) and uploads nothing
    n = len(dest.uploads)
    again = push(store, "fake.test/ns/app:v1", "fake.test/other/app:v3", opts, transport)
    assert len(dest.uploads) == n and "0 uploaded" in str(again)


def test_chunked_push_lost_answer(fake: FakeRegistry, tmp_path: Path) -> None:
    """A chunk that arrived but whose answer was lost is not sent twice: the
    retry's 416 makes push ask the registry how far the upload got."""
    store = Store(str(tmp_path / "store"))
    _pull(store, fake)
    dest = FakeRegistry(lose_patch_answer=2)
    opts = RegistryOptions(**{**OPTS.__dict__, "chunk_size": 100_000, "jobs": 1})
    push(store, "fake.test/ns/app:v1", "fake.test/x/app:v1", opts, httpx.MockTransport(dest))
    assert dest.blobs == {d: fake.blobs[d] for d in dest.blobs} and len(dest.blobs) == 4
    assert any(r.startswith("GET /upload/") for r in dest.requests)


def test_push_imported_image_keeps_digest(fake: FakeRegistry, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    store.import_image(open_source(str(tmp_path / "oci") + ":v1"), "local", progress=False)
    push(store, "local", "fake.test/copy/app:v1", OPTS, httpx.MockTransport(fake))
    assert fake.manifests["copy/app:v1"] == fake.manifests["ns/app:v1"]


def test_rm_prunes_kept_blobs(fake: FakeRegistry, tmp_path: Path) -> None:
    from cowfs.image.registry import prune_blobs
    store = Store(str(tmp_path / "store"))
    _pull(store, fake, name="a")
    _pull(store, fake, name="b")
    kept = set(os.listdir(BlobCache(store).dir))
    assert len(kept) == 5  # manifest, config, 3 layers
    store.remove("a")
    assert prune_blobs(store) == 0
    cache = BlobCache(store)
    with cache.incoming("sha256:" + "cd" * 32):  # a download in progress stays
        (Path(cache.incoming_dir) / ("ef" * 32)).write_bytes(b"left by a failed pull")
        store.remove("b")
        assert prune_blobs(store) == 5
    assert os.listdir(cache.dir) == []
    assert os.listdir(cache.incoming_dir) == ["cd" * 32]


def test_pulled_image_with_bad_source_prunes_nothing(fake: FakeRegistry, tmp_path: Path) -> None:
    """A pulled image's record must name REGISTRY/REPO@DIGEST: otherwise its
    manifest blob is not known, and pruning the kept blobs stops, keeping all."""
    from cowfs.image.records import RecordError, save
    from cowfs.image.registry import prune_blobs
    store = Store(str(tmp_path / "store"))
    _pull(store, fake)
    rec = store.image("fake.test/ns/app:v1")
    save(dataclasses.replace(rec, source="fake.test/ns/app:v1"),
         os.path.join(store.images_dir, os.listdir(store.images_dir)[0]))
    with pytest.raises(RecordError, match="not REGISTRY/REPO@DIGEST"):
        prune_blobs(store)
    assert len(os.listdir(BlobCache(store).dir)) == 5


def test_push_docker_archive_image(tmp_path: Path) -> None:
    """An image imported from `docker save` has no manifest to keep: push writes
    one (without cowfs' archive notes) over the archive's layer blobs."""
    from .imageutil import write_docker_archive
    layers = example_layers()
    write_docker_archive(tmp_path / "img.tar", "arch/app:v1", layers)
    store = Store(str(tmp_path / "store"))
    store.import_image(open_source(str(tmp_path / "img.tar")), "arch", progress=False)
    dest = FakeRegistry()
    push(store, "arch", "fake.test/arch/app:v1", OPTS, httpx.MockTransport(dest))
    data, _ = dest.manifests["arch/app:v1"]
    assert b"x-cowfs" not in data
    assert sorted(dest.blobs) == sorted([sha(t) for t in layers] + [store.image("arch").id])
    other = Store(str(tmp_path / "other"))
    _pull(other, dest, "fake.test/arch/app:v1")
    assert other.images()[0].layers == [sha(t) for t in layers]
