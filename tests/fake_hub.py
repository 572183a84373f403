"""A stand-in for the Hugging Face Hub on 127.0.0.1, so tests run huggingface_hub's real client code offline.

It answers what huggingface_hub 2.x calls to upload a folder and to download files:

- POST /api/repos/create                          create_repo (409 if it exists; the client's exist_ok accepts that)
- POST /api/validate-yaml                         README.md metadata check before an upload (must be a YAML mapping)
- POST /api/models/{repo}/preupload/{rev}         upload modes: every file "regular", so it travels inline
                                                  (base64) in the commit and no LFS / Xet storage is needed
- POST /api/models/{repo}/commit/{rev}            the commit itself: an NDJSON header line, then one line per file
- GET  /api/models/{repo}[/revision/{rev}]        repo_info (resolve_revision: default branch, branch or commit -> sha)
- HEAD/GET /{repo}/resolve/{rev}/{path}           hf_hub_download: ETag (git blob sha1), X-Repo-Commit, Content-Length

Errors carry the X-Error-Code header the client maps to its exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound). Writes need `Authorization: Bearer <token>`; private repositories are invisible without it.
Real Hub behaviour left out: LFS / Xet uploads, branches other than main, pull requests, deletions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

MAX_BODY = 64 * 2**20  # bytes; the tiny test models are far smaller
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [  # (method, pattern, handler name)
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"), "repo_info"),
    ("GET", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


def git_blob_sha(content: bytes) -> str:
    """The git object id of a file, which the Hub sends as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    """An HTTP error reply: status, X-Error-Code header (or None), message, extra headers and extra JSON fields."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: dict | None = None, fields: dict | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self.body = json.dumps({"error": message, **(fields or {})}).encode()


@dataclass
class Repo:
    """A model repository: commits (sha -> files) and branches (name -> sha)."""

    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def add_commit(self, parent: str | None, files: dict[str, bytes], summary: str) -> str:
        """Record a commit on main holding the parent's files plus `files`; returns its sha."""
        tree = {**(self.commits[parent] if parent else {}), **files}
        blobs = sorted((p, git_blob_sha(c)) for p, c in tree.items())
        digest = hashlib.sha1(json.dumps([parent, summary, blobs]).encode())
        sha = digest.hexdigest()
        self.commits[sha] = tree
        self.branches["main"] = sha
        return sha

    def commit_of(self, revision: str) -> str:
        """The commit sha a branch name or sha names."""
        sha = self.branches.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha


class FakeHub:
    """The server and its state; `url` is what HF_ENDPOINT points at, `token` the only valid token."""

    def __init__(self, token: str = "hf_test_token"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and wait (bounded) for the server thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    # ---- helpers for requests ----
    def repo(self, repo_id: str, authorized: bool) -> Repo:
        """The repository, as the caller may see it."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo

    def require_token(self, authorized: bool) -> None:
        if not authorized:
            raise HubError(401, None, "Invalid credentials in Authorization header")

    # ---- endpoints: each returns (status, headers, body bytes) ----
    def create_repo(self, authorized: bool, body: bytes, **_) -> tuple[int, dict, bytes]:
        self.require_token(authorized)
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            # The client reads the URL from this reply too (create_repo with exist_ok).
            raise HubError(409, None, "You already created this model repo", fields={"url": f"{self.url}/{repo_id}"})
        repo = self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        repo.add_commit(None, {".gitattributes": attributes}, "initial commit")
        return reply_json({"url": f"{self.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self, body: bytes, **_) -> tuple[int, dict, bytes]:
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        if not match or not isinstance(yaml.safe_load(match.group(1)), dict):
            raise HubError(400, None, "README.md metadata is not a YAML mapping between --- lines")
        return reply_json({"errors": [], "warnings": []})

    def preupload(self, authorized: bool, body: bytes, repo: str, rev: str, **_) -> tuple[int, dict, bytes]:
        self.require_token(authorized)
        target = self.repo(repo, authorized)
        tree = target.commits[target.commit_of(rev)]
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha(tree[f["path"]]) if f["path"] in tree else None}
            for f in json.loads(body)["files"]
        ]
        return reply_json({"files": files})

    def commit(self, authorized: bool, body: bytes, repo: str, rev: str, **_) -> tuple[int, dict, bytes]:
        self.require_token(authorized)
        target = self.repo(repo, authorized)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        files = {}
        for line in lines[1:]:
            if line["key"] != "file":
                raise HubError(400, None, f"this fake Hub only takes regular files, got {line['key']}")
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        sha = target.add_commit(target.commit_of(rev), files, header["summary"])
        return reply_json({"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha})

    def repo_info(self, authorized: bool, repo: str, rev: str | None, **_) -> tuple[int, dict, bytes]:
        target = self.repo(repo, authorized)
        sha = target.commit_of(rev or "main")
        siblings = [{"rfilename": path} for path in sorted(target.commits[sha])]
        return reply_json({"id": repo, "sha": sha, "private": target.private, "siblings": siblings})

    def resolve(self, authorized: bool, repo: str, rev: str, path: str, **_) -> tuple[int, dict, bytes]:
        target = self.repo(repo, authorized)
        sha = target.commit_of(rev)
        content = target.commits[sha].get(path)
        if content is None:  # the client caches the absence per commit, so it needs the commit too
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {rev}", {"X-Repo-Commit": sha})
        headers = {
            "ETag": f'"{git_blob_sha(content)}"', "X-Repo-Commit": sha, "Content-Type": "application/octet-stream"
        }
        return 200, headers, content


def reply_json(payload: dict) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `hub`."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a stalled client may hold a server thread

        def do_GET(self) -> None:
            self.dispatch("GET")

        def do_HEAD(self) -> None:
            self.dispatch("HEAD")

        def do_POST(self) -> None:
            self.dispatch("POST")

        def dispatch(self, method: str) -> None:
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append((method, path))
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.send(413, {}, b"request too large")
                return
            body = self.rfile.read(length) if length else b""
            authorized = self.headers.get("Authorization") == f"Bearer {hub.token}"
            for route_method, pattern, name in ROUTES:
                match = pattern.fullmatch(path)
                if route_method == method and match:
                    args = {key: value and unquote(value) for key, value in match.groupdict().items()}
                    try:
                        with hub.lock:
                            status, headers, content = getattr(hub, name)(authorized=authorized, body=body, **args)
                    except HubError as err:
                        headers = {**err.headers, "Content-Type": "application/json"}
                        status, content = err.status, err.body
                    self.send(status, headers, content, with_body=method != "HEAD")
                    return
            self.send(404, {}, b"no such endpoint in the fake Hub")

        def send(self, status: int, headers: dict, content: bytes, with_body: bool = True) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(content))}.items():
                self.send_header(key, value)
            self.end_headers()
            if with_body:
                self.wfile.write(content)

        def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
            pass  # keep test output clean; hub.requests records every request

    return Handler
