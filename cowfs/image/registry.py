"""Pulling images from and pushing them to a registry (the OCI distribution API).

A pull resolves the reference (an image index down to one platform's manifest),
downloads the layer blobs the store lacks, a few at a time, each verified
against its sha256 while it streams into STORE/blobs/, and imports them with
`Store.import_image` like any other `ImageSource`.  The blobs stay: a push
sends exactly the blobs and manifest that were pulled (same digests), and an
interrupted pull resumes where it stopped (finished blobs are not fetched
again, the one being fetched continues with a Range request).

    STORE/blobs/sha256/HEX     a verified blob: layer, config or manifest
    STORE/blobs/incoming/HEX   a download in progress (flock'd while written)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import httpx
from tqdm import tqdm

from ..overlay.params import UsageError
from .commit import base_blob
from .errors import ImageError
from .oci import (ARCHIVE_MEMBER, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_CONFIG,
                  MT_OCI_INDEX, MT_OCI_LAYER, MT_OCI_MANIFEST, ImageSource, LayerRef,
                  check_digest, diff_ids, host_platform, mismatch, sha256_digest, verified_json)
from .registry_auth import DOCKER_HUB, Challenge, Credentials, auth_files, find_credentials, \
    parse_www_authenticate
from .records import ImageRecord, RecordError
from .store import Store, chain_ids, human_size

MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                     "application/vnd.docker.distribution.manifest.v1+prettyjws")
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
CONFIG_TYPES = (MT_OCI_CONFIG, MT_DOCKER_CONFIG)
LAYER_TYPES = (MT_OCI_LAYER, MT_OCI_LAYER + "+gzip", MT_OCI_LAYER + "+zstd", MT_DOCKER_LAYER)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
MAX_MANIFEST = 4 << 20           # the distribution spec's suggested limit
CHUNK = 1 << 20
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
HUB_ENDPOINT = "registry-1.docker.io"


# -- references ---------------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")


@dataclass(frozen=True)
class Reference:
    """REGISTRY/REPO[:TAG][@DIGEST], docker's way: no registry means Docker Hub."""
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def endpoint(self) -> str:
        return HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        return (f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))


def parse_reference(spec: str) -> Reference:
    name, _, digest = spec.partition("@")
    if digest:
        check_digest_arg(digest, spec)
    slash = name.rfind("/")
    tag = None
    if ":" in name[slash + 1:]:
        name, _, tag = name.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise UsageError(f"'{spec}': invalid tag {tag!r}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repo = first, rest
        if not _HOST.fullmatch(registry):
            raise UsageError(f"'{spec}': invalid registry {registry!r}")
    else:
        registry, repo = DOCKER_HUB, name
        if "/" not in repo:
            repo = "library/" + repo
    if not _REPO.fullmatch(repo):
        raise UsageError(f"'{spec}': invalid repository name {repo!r} "
                         "(lower case letters, digits, separators . _ - and /)")
    return Reference(registry, repo, tag if tag or digest else "latest", digest or None)


def check_digest_arg(digest: str, spec: str) -> None:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise UsageError(f"'{spec}': invalid or unsupported digest {digest!r} (sha256 only)")


# -- platforms ----------------------------------------------------------------------

_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def parse_platform(spec: str) -> Platform:
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"--platform '{spec}': expected OS/ARCH[/VARIANT], e.g. linux/arm64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def _platform_of(desc: dict) -> Platform | None:
    p = desc.get("platform")
    if not isinstance(p, dict):
        return None
    return Platform(str(p.get("os", "")), str(p.get("architecture", "")),
                    p.get("variant") or None)


def select_manifest(manifests: list[dict], want: Platform) -> dict | None:
    """The index entry for want: os and architecture equal; the variant equal
    when asked for (arm64 means v8, arm v7), else the default or plainest one."""
    ranked: list[tuple[int, int, dict]] = []
    for i, d in enumerate(manifests):
        if d.get("annotations", {}).get("vnd.docker.reference.type") == "attestation-manifest":
            continue
        p = _platform_of(d)
        if p is None:  # an entry that names no platform fits any, after those that do
            ranked.append((3, i, d))
            continue
        if (p.os, p.architecture) != (want.os, want.architecture):
            continue
        default = _DEFAULT_VARIANT.get(p.architecture)
        variant = p.variant or default
        if want.variant is not None:
            if variant == (want.variant or default):
                ranked.append((0, i, d))
        else:
            ranked.append((0 if p.variant is None else 1 if variant == default else 2, i, d))
    return min(ranked, key=lambda r: r[:2])[2] if ranked else None


def _platforms(manifests: list[dict]) -> str:
    names = sorted({str(p) for d in manifests if (p := _platform_of(d)) is not None})
    return ", ".join(names) or "none named"


# -- blobs kept in the store --------------------------------------------------------

class BlobCache:
    """Verified blobs under STORE/blobs, and downloads in progress."""

    def __init__(self, store: Store) -> None:
        self.dir = store.blobs_dir
        self.incoming_dir = os.path.join(store.root, "blobs", "incoming")

    def ensure(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.makedirs(self.incoming_dir, mode=0o700, exist_ok=True)

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, check_digest(digest, "blob")[7:])

    def has(self, digest: str) -> bool:
        return os.path.isfile(self.path(digest))

    def read(self, digest: str) -> bytes | None:
        try:
            with open(self.path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data if sha256_digest(data) == digest else None

    def put(self, data: bytes) -> str:
        self.ensure()
        digest = sha256_digest(data)
        tmp = os.path.join(self.incoming_dir, f"{digest[7:]}.{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path(digest))
        return digest

    @contextlib.contextmanager
    def incoming(self, digest: str) -> Iterator[BinaryIO]:
        """The partial download of digest, locked against other pulls; whatever
        it holds so far (verified at the end) is where the download resumes."""
        self.ensure()
        path = os.path.join(self.incoming_dir, check_digest(digest, "blob")[7:])
        while True:
            f = open(path, "a+b")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            if os.fstat(f.fileno()).st_nlink:  # not finished or discarded while we waited
                break
            f.close()
        try:
            yield f
        finally:
            f.close()

    def finish(self, f: BinaryIO, digest: str) -> None:
        f.flush()
        os.fsync(f.fileno())
        os.rename(os.path.join(self.incoming_dir, digest[7:]), self.path(digest))

    def discard(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.incoming_dir, digest[7:]))

    def prune(self, keep: set[str]) -> int:
        """Delete the kept blobs no image refers to, and partial downloads no
        pull is writing now (they are flock'd while it does); returns how
        many blobs went."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return 0
        gone = 0
        for n in names:
            if "sha256:" + n not in keep:
                os.unlink(os.path.join(self.dir, n))
                gone += 1
        for n in os.listdir(self.incoming_dir):
            if not re.fullmatch(r"[0-9a-f]{64}", n):
                continue  # put()'s short-lived temporary files
            path = os.path.join(self.incoming_dir, n)
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                os.unlink(path)
        return gone


def pulled_from(rec: ImageRecord) -> Reference | None:
    """REGISTRY/REPO@MANIFEST-DIGEST a pulled image came from; None for an imported one."""
    if rec.kind != "registry":
        return None
    try:
        ref: Reference | None = parse_reference(rec.source)
    except UsageError:
        ref = None
    if ref is None or ref.digest is None:
        raise RecordError(f"image {rec.name}: source {rec.source!r} of a pulled image is "
                          "not REGISTRY/REPO@DIGEST")
    return ref


def prune_blobs(store: Store) -> int:
    """Drop kept blobs that no image in the store uses (after `image rm`)."""
    keep: set[str] = set()
    for rec in store.images():
        keep.add(rec.id)
        keep.update(d.get("digest", "") for d in rec.manifest.get("layers", []))
        if (src := pulled_from(rec)) is not None:
            keep.add(src.reference)  # its manifest's digest
    with store.lock():
        return BlobCache(store).prune(keep)


# -- the HTTP client ---------------------------------------------------------------

@dataclass
class RegistryOptions:
    plain_http: bool = False
    ca_file: str | None = None
    auth_file: str | None = None
    retries: int = 4
    jobs: int = 3
    chunk_size: int | None = None     # push in PATCH chunks of this size; None: one PUT
    platform: Platform | None = None
    progress: bool | None = None      # None: bars when stderr is a terminal


def _tls_failure(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _errors(resp: httpx.Response) -> list[tuple[str, str]]:
    """The distribution spec's {"errors": [{"code", "message"}]}, if the body has it."""
    try:
        doc = json.loads(resp.content)
        return [(str(e.get("code", "")), str(e.get("message", ""))) for e in doc["errors"]]
    except (ValueError, KeyError, TypeError, AttributeError, httpx.ResponseNotRead):
        return []


class Arrival:
    """A blob on its way into the cache, readable while it arrives: a layer's
    unpacking follows its download instead of waiting for the end of it."""

    def __init__(self, final: str) -> None:
        self.final = final              # where the blob is once verified
        self.cond = threading.Condition()
        self.path: str | None = None    # the incoming file, once a download writes it
        self.size = 0
        self.done = False
        self.error: str | None = None

    def started(self, path: str, size: int) -> None:
        with self.cond:
            self.path, self.size = path, size
            self.cond.notify_all()

    def grew(self, size: int) -> None:
        with self.cond:
            self.size = size
            self.cond.notify_all()

    def finished(self, error: BaseException | None) -> None:
        with self.cond:
            self.done = True
            self.error = None if error is None else str(error) or type(error).__name__
            self.cond.notify_all()

    def reader(self) -> BinaryIO:
        return io.BufferedReader(_Follower(self), CHUNK)


class _Follower(io.RawIOBase):
    """Reads an Arrival's bytes as they are written; at the end, raises the
    download's error (a digest mismatch, a broken connection) if it failed."""

    def __init__(self, arrival: Arrival) -> None:
        self.arrival = arrival
        self.fd: int | None = None
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        a = self.arrival
        with a.cond:
            a.cond.wait_for(lambda: a.done or (a.path is not None and a.size > self.pos))
            if a.error is not None:
                raise ImageError(a.error)
            if self.fd is None:
                self.fd = self._open()
        data = os.pread(self.fd, len(b), self.pos)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def _open(self) -> int:
        """The download's file, or the cached blob it was renamed to; neither
        means the download failed (and discarded its file) before the first
        read: its error, once it is told.  Called with the arrival's lock."""
        a = self.arrival
        for path in (a.path or a.final, a.final):
            with contextlib.suppress(FileNotFoundError):
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        a.cond.wait_for(lambda: a.done)
        raise ImageError(a.error or f"{a.final}: the download's file went missing")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        super().close()


class Registry:
    """One registry, with its auth state: anonymous, basic, or bearer tokens
    per scope, got from the realm its WWW-Authenticate challenge names."""

    def __init__(self, host: str, opts: RegistryOptions,
                 transport: httpx.BaseTransport | None = None,
                 creds: Credentials | None = None) -> None:
        self.host = host
        self.opts = opts
        self.base = f"{'http' if opts.plain_http else 'https'}://{host}"
        verify: ssl.SSLContext | bool = True
        if opts.ca_file:
            if not os.path.isfile(opts.ca_file):
                raise UsageError(f"--ca-file '{opts.ca_file}': no such file")
            try:
                verify = ssl.create_default_context(cafile=opts.ca_file)
            except ssl.SSLError as e:
                raise UsageError(f"--ca-file '{opts.ca_file}': not a PEM certificate ({e})")
        self.http = httpx.Client(verify=verify, transport=transport, follow_redirects=True,
                                 timeout=httpx.Timeout(60, connect=15),
                                 limits=httpx.Limits(max_connections=max(4, opts.jobs + 1)))
        self.creds = creds
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, ...], str] = {}
        self._basic = False

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return urllib.parse.urljoin(self.base, path)

    def backoff(self, attempt: int) -> None:
        time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))

    def _auth_header(self, scopes: tuple[str, ...]) -> dict[str, str]:
        with self._lock:
            token = self._tokens.get(scopes)
            if token:
                return {"Authorization": f"Bearer {token}"}
            if self._basic and self.creds is not None:
                return {"Authorization": self.creds.basic_header()}
        return {}

    def send(self, method: str, url: str, scopes: tuple[str, ...], *,
             headers: dict[str, str] | None = None,
             params: dict[str, str] | list[tuple[str, str]] | None = None,
             body: Callable[[], object] | None = None, stream: bool = False,
             auth: bool = True) -> httpx.Response:
        """One request, authenticated on the registry's first 401 (unless not
        auth), retried with backoff on connection failures and 5xx; other
        statuses go to the caller."""
        attempt = 0
        authenticated = not auth
        full = httpx.URL(self.url(url))
        if params:  # keep the query an upload Location carries (its _state)
            full = full.copy_merge_params(params)
        while True:
            req = self.http.build_request(method, full,
                                          headers={**(headers or {}),
                                                   **(self._auth_header(scopes) if auth else {})},
                                          content=body() if body else None)  # type: ignore[arg-type]
            try:
                resp = self.http.send(req, stream=stream)
            except httpx.TransportError as e:
                if _tls_failure(e):
                    raise ImageError(f"{self.host}: TLS failed ({e}); a private CA needs "
                                     "--ca-file, a plain HTTP registry --plain-http") from None
                attempt += 1
                if attempt > self.opts.retries:
                    raise ImageError(f"{self.host}: registry unreachable "
                                     f"({e or type(e).__name__})") from None
                self.backoff(attempt)
                continue
            if resp.status_code == 401 and not authenticated:
                challenge = resp.headers.get("www-authenticate", "")
                resp.close()
                self._authenticate(challenge, scopes)
                authenticated = True
                continue
            if resp.status_code in RETRY_STATUS and attempt < self.opts.retries:
                resp.close()
                attempt += 1
                self.backoff(attempt)
                continue
            return resp

    def _authenticate(self, header: str, scopes: tuple[str, ...]) -> None:
        challenges = parse_www_authenticate(header)
        for ch in challenges:
            if ch.scheme == "bearer":
                token = self._token(ch, scopes)
                with self._lock:
                    self._tokens[scopes] = token
                return
        for ch in challenges:
            if ch.scheme == "basic":
                if self.creds is None:
                    raise ImageError(f"{self.host}: the registry wants a login and no auth file "
                                     f"has one for it (looked in {', '.join(self._files())})")
                self._basic = True
                return
        raise ImageError(f"{self.host}: access refused and no usable challenge "
                         f"(WWW-Authenticate: {header or 'none'})")

    def _files(self) -> list[str]:
        return [self.opts.auth_file] if self.opts.auth_file else auth_files()

    def _token(self, ch: Challenge, scopes: tuple[str, ...]) -> str:
        realm = ch.params.get("realm")
        if not realm:
            raise ImageError(f"{self.host}: bearer challenge without a realm")
        params = [("service", ch.params["service"])] if "service" in ch.params else []
        params += [("scope", s) for s in scopes]
        headers = {"Authorization": self.creds.basic_header()} if self.creds else {}
        resp = self.send("GET", realm, (), params=params, headers=headers, auth=False)
        if resp.status_code in (401, 403):
            who = f"credentials from {self.creds.source}" if self.creds else "anonymous access"
            raise ImageError(f"{self.host}: authentication refused by {realm} ({who})")
        if resp.status_code != 200:
            raise ImageError(f"{self.host}: token server {realm}: HTTP {resp.status_code}")
        try:
            doc = resp.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError(f"{self.host}: token server {realm} sent no token")
        return token

    def error(self, resp: httpx.Response, what: str) -> ImageError:
        """The one line for a status the caller did not expect."""
        with contextlib.suppress(httpx.HTTPError):
            resp.read()
        errors = _errors(resp)
        codes = {c for c, _ in errors}
        detail = "; ".join(m or c for c, m in errors) or resp.reason_phrase
        status = resp.status_code
        if status == 401:
            who = f"credentials from {self.creds.source}" if self.creds else "anonymous access"
            return ImageError(f"{what}: authentication refused by {self.host} ({who})")
        if status == 403:
            return ImageError(f"{what}: access denied by {self.host} ({detail})")
        if status == 404 or codes & {"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"}:
            if "NAME_UNKNOWN" in codes:
                return ImageError(f"{what}: no such repository on {self.host}")
            if "MANIFEST_UNKNOWN" in codes or "manifests/" in str(resp.request.url):
                return ImageError(f"{what}: no such tag or digest on {self.host}")
            return ImageError(f"{what}: not found on {self.host} ({detail})")
        return ImageError(f"{what}: {self.host} answered HTTP {status} ({detail})")

    # -- pull side --------------------------------------------------------------
    def manifest(self, repo: str, reference: str, what: str) -> tuple[bytes, str, dict]:
        """(bytes, digest, document) of a manifest or index, digest checked."""
        resp = self.send("GET", f"/v2/{repo}/manifests/{reference}", _scopes(repo, "pull"),
                         headers={"Accept": ACCEPT})
        if resp.status_code == 404:
            raise self._not_found(resp, repo, reference, what)
        if resp.status_code != 200:
            raise self.error(resp, what)
        data = resp.content
        if len(data) > MAX_MANIFEST:
            raise ImageError(f"{what}: manifest of {len(data)} bytes is too large")
        digest = sha256_digest(data)
        claimed = reference if reference.startswith("sha256:") else \
            resp.headers.get("docker-content-digest", "")
        if claimed.startswith("sha256:") and claimed != digest:
            raise mismatch(f"{what} manifest", claimed, digest)
        doc = verified_json(data, None, f"{what} manifest")
        if not doc.get("mediaType"):
            doc_type = resp.headers.get("content-type", "").split(";")[0].strip()
            if doc_type in (*MANIFEST_TYPES, *INDEX_TYPES):
                return data, digest, {**doc, "mediaType": doc_type}
        return data, digest, doc

    def _not_found(self, resp: httpx.Response, repo: str, reference: str,
                   what: str) -> ImageError:
        """A missing manifest, told apart (as registries often do not): no such
        repository, or no such tag, with the tags there are."""
        tags = self.send("GET", f"/v2/{repo}/tags/list", _scopes(repo, "pull"))
        try:
            names = tags.json().get("tags") if tags.status_code == 200 else None
        except ValueError:
            names = None
        if tags.status_code == 404 or (tags.status_code == 200 and not names):
            return ImageError(f"{what}: no such repository on {self.host}")
        if isinstance(names, list) and not reference.startswith("sha256:"):
            shown = ", ".join(sorted(map(str, names))[:10])
            return ImageError(f"{what}: no such tag on {self.host} (tags: {shown})")
        return self.error(resp, what)

    def blob(self, repo: str, digest: str, what: str) -> bytes:
        """A small blob (a config), read whole and checked."""
        resp = self.send("GET", f"/v2/{repo}/blobs/{digest}", _scopes(repo, "pull"))
        if resp.status_code != 200:
            raise self.error(resp, what)
        if sha256_digest(resp.content) != digest:
            raise mismatch(what, digest, sha256_digest(resp.content))
        return resp.content

    def fetch(self, repo: str, desc: Descriptor, cache: BlobCache, bar: tqdm,
              stop: threading.Event, arrival: Arrival) -> int:
        """Download a blob into the cache, resuming a partial one; returns the
        bytes fetched now.  The sha256 covers every byte, resumed or not;
        arrival hears of every byte written, for a reader following along."""
        digest, size = desc.digest, desc.size
        what = f"layer blob {digest}"
        with cache.incoming(digest) as f:
            if cache.has(digest):  # another pull finished it while we waited
                return 0
            sha = hashlib.sha256()
            f.seek(0)
            while chunk := f.read(CHUNK):
                sha.update(chunk)
            offset = f.tell()
            bar.update(offset)
            fetched = 0
            resumed = offset > 0
            if not resumed:  # a partial file is only known good at the end: no following it
                arrival.started(f.name, offset)
            while True:
                broken = 0
                while offset < size:
                    headers = {"Accept-Encoding": "identity"}
                    if offset:
                        headers["Range"] = f"bytes={offset}-"
                    resp = self.send("GET", f"/v2/{repo}/blobs/{digest}", _scopes(repo, "pull"),
                                     headers=headers, stream=True)
                    try:
                        if resp.status_code == 416 and offset:  # more than the blob: anew
                            sha, offset = _restart(f, bar, offset)
                            continue
                        if resp.status_code not in (200, 206):
                            raise self.error(resp, what)
                        if offset and resp.status_code == 200:  # no ranges here: anew
                            sha, offset = _restart(f, bar, offset)
                        for chunk in resp.iter_bytes():  # as received: a break loses nothing
                            if stop.is_set():
                                raise ImageError(f"{what}: download stopped")
                            f.write(chunk)
                            f.flush()
                            sha.update(chunk)
                            offset += len(chunk)
                            arrival.grew(offset)
                            fetched += len(chunk)
                            bar.update(len(chunk))
                            if offset > size:
                                break
                        break
                    except httpx.TransportError as e:  # the connection broke mid-blob
                        broken += 1
                        if broken > self.opts.retries:
                            raise ImageError(f"{what}: download broke off at byte {offset} "
                                             f"({e or type(e).__name__}); run the pull again "
                                             "to resume") from None
                        self.backoff(broken)
                    finally:
                        resp.close()
                got = "sha256:" + sha.hexdigest()
                if got == digest and offset == size:
                    break
                if resumed:  # the partial file was not the blob's start: once more, whole
                    sha, offset = _restart(f, bar, offset)
                    resumed = False
                    continue
                cache.discard(digest)
                raise mismatch(what, digest, got if offset == size
                               else f"{offset} bytes of {size}")
            cache.finish(f, digest)
        return fetched

    # -- push side ----------------------------------------------------------------
    def push_blob(self, repo: str, digest: str, path: str, mount_from: str | None,
                  bar: tqdm) -> str:
        """Put one blob into repo unless it is there; returns how: 'exists',
        'mounted' (cross-repository mount) or 'uploaded'."""
        size = os.path.getsize(path)
        what = f"blob {digest}"
        scopes = _scopes(repo, "pull,push", mount_from)
        resp = self.send("HEAD", f"/v2/{repo}/blobs/{digest}", scopes)
        if resp.status_code == 200:
            bar.update(size)
            return "exists"
        if resp.status_code != 404:
            raise self.error(resp, what)
        params = {"mount": digest, "from": mount_from} if mount_from else None
        resp = self.send("POST", f"/v2/{repo}/blobs/uploads/", scopes, params=params)
        if resp.status_code == 201:
            bar.update(size)
            return "mounted"
        if resp.status_code != 202 or "location" not in resp.headers:
            raise self.error(resp, what)
        location = self.url(resp.headers["location"])
        octets = {"Content-Type": "application/octet-stream"}
        if self.opts.chunk_size:
            with open(path, "rb") as f:
                offset = 0
                while data := f.read(self.opts.chunk_size):
                    resp = self.send("PATCH", location, scopes, body=lambda d=data: d, headers={
                        **octets, "Content-Range": f"{offset}-{offset + len(data) - 1}",
                        "Content-Length": str(len(data))})
                    if resp.status_code == 416:  # a retried chunk had arrived: ask how far
                        location, got = self._upload_status(location, scopes, what)
                        bar.update(got - offset)
                        offset = got
                        f.seek(offset)
                        continue
                    if resp.status_code != 202 or "location" not in resp.headers:
                        raise self.error(resp, f"{what} (chunk at {offset})")
                    location = self.url(resp.headers["location"])
                    offset += len(data)
                    bar.update(len(data))
            resp = self.send("PUT", location, scopes, params={"digest": digest},
                             headers={"Content-Length": "0"})
        else:
            resp = self.send("PUT", location, scopes, params={"digest": digest},
                             headers={**octets, "Content-Length": str(size)},
                             body=lambda: _file_chunks(path, bar))
        if resp.status_code != 201:
            raise self.error(resp, what)
        return "uploaded"

    def _upload_status(self, location: str, scopes: tuple[str, ...],
                       what: str) -> tuple[str, int]:
        """(location, bytes the registry holds) of an upload in progress."""
        resp = self.send("GET", location, scopes)
        m = re.fullmatch(r"0-(\d+)", resp.headers.get("range", ""))
        if resp.status_code != 204 or not m or "location" not in resp.headers:
            raise self.error(resp, f"{what} (upload status)")
        return self.url(resp.headers["location"]), int(m.group(1)) + 1

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> None:
        resp = self.send("PUT", f"/v2/{repo}/manifests/{reference}", _scopes(repo, "pull,push"),
                         headers={"Content-Type": media_type}, body=lambda: data)
        if resp.status_code not in (200, 201):
            raise self.error(resp, f"manifest {reference}")
        claimed = resp.headers.get("docker-content-digest", "")
        if claimed and claimed != sha256_digest(data):
            raise ImageError(f"manifest {reference}: {self.host} stored it as {claimed}, "
                             f"not {sha256_digest(data)}")


def _scopes(repo: str, actions: str, mount_from: str | None = None) -> tuple[str, ...]:
    own = (f"repository:{repo}:{actions}",)
    return own + (f"repository:{mount_from}:pull",) if mount_from else own


def _restart(f: BinaryIO, bar: tqdm, offset: int) -> tuple[hashlib._Hash, int]:
    f.seek(0)
    f.truncate()
    bar.update(-offset)
    return hashlib.sha256(), 0


def _file_chunks(path: str, bar: tqdm) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            bar.update(len(data))
            yield data


# -- progress -----------------------------------------------------------------------

class _BlobBar(tqdm):
    """One blob's bar: its updates count in the total too, and its line is
    given back when it closes, so the bars in flight stay on -j lines."""

    def __init__(self, progress: Progress, slot: int, **kw: object) -> None:
        self.progress, self.slot = progress, slot
        super().__init__(position=slot, **kw)  # type: ignore[arg-type]

    def update(self, n: float | None = 1) -> bool | None:
        self.progress.total.update(n)
        return super().update(n)

    def close(self) -> None:
        super().close()
        with self.progress.lock:
            self.progress.free.add(self.slot)


class Progress:
    """A total bar and one bar per blob in flight (bytes and rate)."""

    def __init__(self, total: int, enabled: bool | None, desc: str) -> None:
        self.disable = (not sys.stderr.isatty()) if enabled is None else not enabled
        self.total = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                          disable=self.disable, position=0, leave=not self.disable)
        self.lock = threading.Lock()
        self.free: set[int] = set()
        self._next = 1

    def bar(self, digest: str, size: int | None) -> tqdm:
        with self.lock:
            if self.free:
                slot = min(self.free)
                self.free.discard(slot)
            else:
                slot, self._next = self._next, self._next + 1
        return _BlobBar(self, slot, total=size, unit="B", unit_scale=True, desc=digest[7:19],
                        file=sys.stderr, disable=self.disable, leave=False)

    def close(self) -> None:
        self.total.close()


# -- pull -----------------------------------------------------------------------------

@dataclass
class PullSummary:
    ref: str
    name: str
    manifest_digest: str
    image_id: str
    layers: int
    downloaded: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"pulled {self.ref} as {self.name} ({self.image_id[7:19]}, manifest "
                f"{self.manifest_digest[7:19]}): {self.layers} layers, "
                f"{len(self.downloaded)} downloaded ({human_size(self.downloaded_bytes)}), "
                f"{self.layers - len(self.downloaded)} already here")


def _resolve(reg: Registry, ref: Reference, want: Platform) -> tuple[bytes, str, dict]:
    """(bytes, digest, manifest) for ref: an image index followed down to want's manifest."""
    what = str(ref)
    data, digest, doc = reg.manifest(ref.repository, ref.reference, what)
    for _ in range(3):
        mt = doc.get("mediaType")
        if mt in MT_DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
            raise ImageError(f"{what}: unsupported manifest type (Docker schema 1); "
                             "the registry must serve schema 2 or OCI")
        if mt in INDEX_TYPES or (mt is None and "manifests" in doc):
            manifests = doc.get("manifests")
            desc = select_manifest(manifests if isinstance(manifests, list) else [], want)
            if desc is None:
                raise ImageError(f"{what}: no manifest for {want} "
                                 f"(the index has {_platforms(manifests or [])})")
            child = check_digest(desc.get("digest"), f"{what} index entry")
            data, digest, doc = reg.manifest(ref.repository, child, what)
            continue
        if mt not in MANIFEST_TYPES and not (mt is None and "layers" in doc):
            raise ImageError(f"{what}: unsupported manifest type {mt!r}")
        return data, digest, doc
    raise ImageError(f"{what}: image indexes nested too deeply")


@dataclass(frozen=True)
class Descriptor:
    """A manifest's reference to a blob, checked."""
    media_type: str
    digest: str
    size: int


def _image_blobs(manifest: dict, what: str) -> tuple[Descriptor, list[Descriptor]]:
    """The config and layer descriptors of an image manifest, of types cowfs reads."""
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise ImageError(f"{what}: the manifest names no config")
    if config.get("mediaType") not in CONFIG_TYPES:
        raise ImageError(f"{what}: not a container image (config type "
                         f"{config.get('mediaType')!r})")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{what}: the manifest lists no layers")
    for d in layers:
        if not isinstance(d, dict) or d.get("mediaType") not in LAYER_TYPES:
            raise ImageError(f"{what}: unsupported layer type "
                             f"{d.get('mediaType') if isinstance(d, dict) else d!r}")
    out = []
    for d in [config, *layers]:
        digest = check_digest(d.get("digest"), f"{what} blob")
        if not isinstance(d.get("size"), int) or d["size"] < 0:
            raise ImageError(f"{what}: blob {digest} has no valid size")
        out.append(Descriptor(d["mediaType"], digest, d["size"]))
    return out[0], out[1:]


def pull(store: Store, spec: str, opts: RegistryOptions, name: str | None = None,
         transport: httpx.BaseTransport | None = None) -> PullSummary:
    ref = parse_reference(spec)
    want = opts.platform or Platform(*host_platform())
    cache = BlobCache(store)
    creds = find_credentials(ref.registry, ref.repository,
                             [opts.auth_file] if opts.auth_file else None)
    with Registry(ref.endpoint, opts, transport, creds) as reg:
        mdata, mdigest, manifest = _resolve(reg, ref, want)
        what = str(ref)
        cdesc, ldescs = _image_blobs(manifest, what)
        cdigest = cdesc.digest
        config = cache.read(cdigest) or reg.blob(ref.repository, cdigest, f"{what} config")
        ids = diff_ids(verified_json(config, cdigest, f"{what} config"), len(ldescs),
                       f"{what} config")
        # A blob is needed only for a layer the store lacks over this very base.
        todo = list({d.digest: d for d, cid in zip(ldescs, chain_ids(ids))
                     if not store.has_layer(cid) and not cache.has(d.digest)}.values())
        summary = PullSummary(str(ref), name or str(ref), mdigest, cdigest, len(ldescs))
        progress = Progress(sum(d.size for d in todo), opts.progress, "pull")
        stop = threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor(max(1, opts.jobs), "cowfs-pull")
        try:
            arrivals = {d.digest: Arrival(cache.path(d.digest)) for d in todo}

            def download(desc: Descriptor) -> int:
                bar = progress.bar(desc.digest, desc.size)
                arrival = arrivals[desc.digest]
                try:
                    fetched = reg.fetch(ref.repository, desc, cache, bar, stop, arrival)
                except BaseException as e:
                    arrival.finished(e)
                    raise
                finally:
                    bar.close()
                arrival.finished(None)
                return fetched
            futures = {d.digest: pool.submit(download, d) for d in todo}

            def opener(digest: str) -> BinaryIO:
                if digest in arrivals:
                    return arrivals[digest].reader()
                try:
                    return open(cache.path(digest), "rb")
                except FileNotFoundError:
                    raise ImageError(f"layer blob {digest} went missing from "
                                     f"{cache.dir}") from None
            layers = [LayerRef(what=f"layer blob {d.digest}", diff_id=diff_id,
                               digest=d.digest, media_type=d.media_type, size=d.size,
                               opener=lambda g=d.digest: opener(g))
                      for d, diff_id in zip(ldescs, ids)]
            cache.put(mdata)  # kept, with the config, for a push of the same digests
            cache.put(config)
            src = ImageSource("registry", f"{ref.registry}/{ref.repository}@{mdigest}",
                              summary.name, manifest, config, cdigest, layers)
            imported = store.import_image(src, summary.name, progress=False)
            for digest, fut in futures.items():
                fetched = fut.result()
                if fetched:
                    summary.downloaded.append(digest)
                    summary.downloaded_bytes += fetched
            summary.warnings = imported.warnings
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()
    return summary


# -- push -----------------------------------------------------------------------------

@dataclass
class PushSummary:
    ref: str
    manifest_digest: str
    blobs: dict[str, str] = field(default_factory=dict)    # digest -> how it got there
    uploaded_bytes: int = 0

    def __str__(self) -> str:
        counts = {how: sum(1 for h in self.blobs.values() if h == how)
                  for how in ("uploaded", "mounted", "exists")}
        return (f"pushed {self.ref} (manifest {self.manifest_digest[7:19]}): "
                f"{len(self.blobs)} blobs, {counts['uploaded']} uploaded "
                f"({human_size(self.uploaded_bytes)}), {counts['mounted']} mounted, "
                f"{counts['exists']} already there")


def _oci_manifest_bytes(layout: str, manifest: dict) -> bytes | None:
    """The exact bytes of manifest in the OCI layout it was imported from."""
    try:
        with open(os.path.join(layout, "index.json"), "rb") as f:
            todo = json.loads(f.read()).get("manifests", [])
    except (OSError, ValueError):
        return None
    for _ in range(3):
        nested = []
        for d in todo:
            try:
                with open(os.path.join(layout, "blobs", "sha256",
                                       check_digest(d.get("digest"), "blob")[7:]), "rb") as f:
                    data = f.read()
                doc = json.loads(data)
            except (OSError, ValueError, ImageError):
                continue
            if doc == manifest and sha256_digest(data) == d["digest"]:
                return data
            nested += doc.get("manifests", []) if isinstance(doc, dict) else []
        todo = nested
    return None


def _push_manifest(rec: ImageRecord, cache: BlobCache) -> bytes:
    """The image's manifest as pulled or imported, byte for byte when those bytes
    are still at hand (so the digest stays); else the stored record, written anew."""
    manifest = rec.manifest
    data: bytes | None = None
    if (src := pulled_from(rec)) is not None:
        data = cache.read(src.reference)
    elif rec.kind == "oci":
        data = _oci_manifest_bytes(rec.source, manifest)
    if data is not None and json.loads(data) == manifest:
        return data
    fresh = {**manifest, "mediaType": manifest.get("mediaType", MT_OCI_MANIFEST),
             "layers": [{k: v for k, v in d.items() if k != ARCHIVE_MEMBER}
                        for d in manifest.get("layers", [])]}
    return json.dumps(fresh, separators=(",", ":")).encode()


def _stage_blob(rec: ImageRecord, digest: str, cache: BlobCache) -> str:
    """The path of a layer blob in the cache, copied (and checked) from where the
    image was imported from if it is not there yet."""
    if cache.has(digest):
        return cache.path(digest)
    # the stored descriptor: an archive import notes the blob's member name there
    desc = next((d for d in rec.manifest.get("layers", []) if d.get("digest") == digest),
                {"digest": digest})
    with base_blob(rec, desc, cache.dir) as src, cache.incoming(digest) as f:
        if src is None:
            raise ImageError(f"layer blob {digest} of {rec.name} is not kept in the store "
                             f"and not at {rec.source} any more; pull or import the "
                             "image again to push it")
        f.seek(0)
        f.truncate()
        sha = hashlib.sha256()
        while chunk := src.read(CHUNK):
            sha.update(chunk)
            f.write(chunk)
        if "sha256:" + sha.hexdigest() != digest:
            cache.discard(digest)
            raise mismatch(f"layer blob {digest} at {rec.source}", digest,
                           "sha256:" + sha.hexdigest())
        cache.finish(f, digest)
    return cache.path(digest)


def push(store: Store, image: str, spec: str, opts: RegistryOptions,
         transport: httpx.BaseTransport | None = None) -> PushSummary:
    ref = parse_reference(spec)
    rec = store.image(image)
    cache = BlobCache(store)
    data = _push_manifest(rec, cache)
    manifest = json.loads(data)
    cdesc, ldescs = _image_blobs(manifest, rec.name)
    config = rec.config.encode()
    if sha256_digest(config) != cdesc.digest:
        raise mismatch(f"{rec.name} config", cdesc.digest, sha256_digest(config))
    paths = {cdesc.digest: cache.path(cache.put(config))}
    for d in ldescs:
        paths.setdefault(d.digest, _stage_blob(rec, d.digest, cache))
    mount_from = None
    src = pulled_from(rec)
    if src is not None and src.registry == ref.registry and src.repository != ref.repository:
        mount_from = src.repository
    creds = find_credentials(ref.registry, ref.repository,
                             [opts.auth_file] if opts.auth_file else None)
    summary = PushSummary(str(ref), sha256_digest(data))
    with Registry(ref.endpoint, opts, transport, creds) as reg:
        progress = Progress(sum(os.path.getsize(p) for p in paths.values()), opts.progress,
                            "push")
        try:
            def upload(digest: str) -> str:
                bar = progress.bar(digest, os.path.getsize(paths[digest]))
                try:
                    return reg.push_blob(ref.repository, digest, paths[digest],
                                         mount_from, bar)
                finally:
                    bar.close()
            with concurrent.futures.ThreadPoolExecutor(max(1, opts.jobs), "cowfs-push") as pool:
                for digest, how in zip(paths, pool.map(upload, paths)):
                    summary.blobs[digest] = how
                    if how == "uploaded":
                        summary.uploaded_bytes += os.path.getsize(paths[digest])
        finally:
            progress.close()
        mt = manifest.get("mediaType") or MT_OCI_MANIFEST
        reg.put_manifest(ref.repository, ref.reference, data, mt)
    return summary


# -- command-line options ------------------------------------------------------------

def options_from(ns: argparse.Namespace) -> RegistryOptions:
    if ns.retries < 0 or ns.jobs < 1:
        raise UsageError("--retries must be >= 0 and --jobs >= 1")
    chunk = getattr(ns, "chunk_size", None)
    if chunk is not None and chunk < 1:
        raise UsageError("--chunk-size must be a positive number of bytes")
    platform = getattr(ns, "platform", None)
    return RegistryOptions(plain_http=ns.plain_http, ca_file=ns.ca_file, auth_file=ns.authfile,
                           retries=ns.retries, jobs=ns.jobs, chunk_size=chunk,
                           platform=parse_platform(platform) if platform else None,
                           progress=False if ns.quiet else None)
