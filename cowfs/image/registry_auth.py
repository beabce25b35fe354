"""Registry credentials and challenges: the auth files docker and podman write,
and the `WWW-Authenticate` header that says how a registry wants them.

Auth files are looked up as containers-auth.json(5) and docker do: the first
file holding an entry for the registry (or, for containers files, for the
repository or one of its namespaces) wins.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field

from .errors import ImageError

DOCKER_HUB = "docker.io"
# docker login writes Docker Hub's credentials under its v1 index URL.
_HUB_KEYS = ("index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str              # the auth file they came from, for messages

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass
class Challenge:
    """One challenge of a WWW-Authenticate header: scheme and its parameters."""
    scheme: str                                      # lower case: "basic", "bearer"
    params: dict[str, str] = field(default_factory=dict)


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# Unquoted values are tokens by the RFC; registries send bare URLs too.
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*({_QUOTED}|[^,\s"]+)\s*(?:,|$)')
_SCHEME = re.compile(rf"\s*,?\s*({_TOKEN})(?:\s+|$)")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """RFC 7235 challenges: `Bearer realm="...",service="...",scope="a:b:pull,push"`,
    possibly several in one header (a scope holds commas, so split with care)."""
    out: list[Challenge] = []
    pos = 0
    while pos < len(header):
        m = _SCHEME.match(header, pos)
        if not m:
            break
        ch = Challenge(m.group(1).lower())
        pos = m.end()
        while pos < len(header):
            p = _PARAM.match(header, pos)
            if not p:
                break
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            ch.params[p.group(1).lower()] = value
            pos = p.end()
        out.append(ch)
    return out


def auth_files() -> list[str]:
    """Where credentials may be, in the order podman and docker look."""
    env = os.environ
    home = os.path.expanduser("~")
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(env["REGISTRY_AUTH_FILE"])
    if env.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(env["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    config_home = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files.append(os.path.join(config_home, "containers", "auth.json"))
    files.append(os.path.join(env.get("DOCKER_CONFIG") or os.path.join(home, ".docker"),
                              "config.json"))
    return files


def _host_of(key: str) -> str:
    """An auths key as a registry[/path]: docker writes 'https://host/v1/' too."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            return key[len(prefix):].split("/", 1)[0]
    return key.rstrip("/")


def _decode(entry: dict, path: str, key: str) -> Credentials | None:
    if entry.get("username") and entry.get("password"):
        return Credentials(entry["username"], entry["password"], path)
    auth = entry.get("auth")
    if not auth:
        return None  # an entry kept by a credential helper: nothing inline
    try:
        user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        user, sep = "", ""
    if not sep:
        raise ImageError(f"{path}: the auth entry for {key} is not base64 of user:password")
    return Credentials(user, password, path)


def find_credentials(registry: str, repository: str,
                     files: list[str] | None = None) -> Credentials | None:
    """Credentials for registry/repository from the first auth file with an entry."""
    wanted = [f"{registry}/{repository}"]
    parts = repository.split("/")
    wanted += [f"{registry}/{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1)]
    wanted.append(registry)
    for path in files if files is not None else auth_files():
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise ImageError(f"{path}: cannot read the auth file ({e})") from None
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        by_name: dict[str, tuple[str, dict]] = {}
        for key, entry in auths.items():
            name = _host_of(key)
            if name in _HUB_KEYS:
                name = DOCKER_HUB
            if isinstance(entry, dict):
                by_name.setdefault(name, (key, entry))
        for name in wanted:
            if name in by_name:
                key, entry = by_name[name]
                creds = _decode(entry, path, key)
                if creds is not None:
                    return creds
    return None
