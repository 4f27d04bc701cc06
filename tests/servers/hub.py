"""A stand-in for the Hugging Face Hub's HTTP API, on 127.0.0.1: downloads, and the
uploads, commits and deletions of a checkpoint mirror.

Serves the repos found under a local directory, laid out as the Hub names them:

    ROOT/datasets/OWNER/NAME/...   dataset repos
    ROOT/models/OWNER/NAME/...     model repos
    ROOT/spaces/OWNER/NAME/...     spaces

and speaks what `huggingface_hub`'s snapshot_download / hf_hub_download send (point the
client at it with HF_ENDPOINT, which huggingface_hub reads when it is imported):

    GET  /api/{models,datasets,spaces}/OWNER/NAME[/revision/REV]   repo info: id, sha, siblings
    GET  /api/{models,datasets,spaces}/OWNER/NAME/tree/REV[/PATH]  the file listing, paginated
         ?recursive=true|false&cursor=N                            with a Link: rel="next" header
    HEAD /[datasets/|spaces/]OWNER/NAME/resolve/REV/PATH           a file's metadata
    GET  /[datasets/|spaces/]OWNER/NAME/resolve/REV/PATH           its bytes (Range honoured)

and what `HfApi.create_repo`, `create_commit` / `upload_folder` (through the LFS
protocol, as huggingface_hub does it with HF_HUB_DISABLE_XET=1) and deletions send:

    POST /api/repos/create                               {"name", "organization", "visibility"}
    POST /api/{models,...}/OWNER/NAME/preupload/main     "lfs" for LFS files (below), else "regular"
    POST /[datasets/|spaces/]OWNER/NAME.git/info/lfs/objects/batch   where to PUT each LFS object
    PUT  /lfs-upload/SHA256?secret=S                     its bytes (as to S3: no token, a secret URL)
    POST /lfs-verify/SHA256                              the client's check that it arrived
    POST /api/{models,...}/OWNER/NAME/commit/main        ndjson: a header, then file (base64),
                                                         lfsFile, deletedFile, deletedFolder lines

A commit is checked whole before any of it is applied (an lfsFile whose object was not
uploaded, a deletion of what is not there: 4xx and no change), then written to the repo
directory. Uploaded LFS objects are kept in ROOT/.lfs/.

Every repo has a single commit whose sha is a hash of its files, so changing a file makes
a new commit; REV may be "main" or that sha. Files described as LFS (parquet, safetensors,
bin, or anything over 10 MB) get the LFS fields of the real Hub: a sha256 ETag with
X-Linked-Etag / X-Linked-Size, and `lfs` in the tree listing. Errors carry the Hub's
X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), which huggingface_hub turns
into its typed exceptions.

For tests: `token` (requests must then send `Authorization: Bearer TOKEN`), `page_size`,
`fail_downloads` {path in repo: HTTP status for GETs of its bytes}, `slow_downloads`
{path in repo: seconds to wait before each 64 KiB chunk}, `fail_all` (an HTTP status
answered to every request while set), `fail_commits` (how many commits to answer with
500 before taking them), and a log of every request (`requests`, `authorizations`,
`bytes_sent`) and commit (`commits`: (repo id, summary)); `private` {repo id: bool} for
repos created through the API.

To add endpoints (uploads, say), append (method, compiled regex, handler) to ROUTES; a
handler gets (server, request handler, regex match).

    python tests/servers/hub.py ROOT --port 8000   # then HF_ENDPOINT=http://127.0.0.1:8000
"""

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:
    from servers.local_server import LocalServer
except ImportError:  # run as a script (python tests/servers/NAME.py): its folder is on sys.path
    from local_server import LocalServer

REPO_TYPES = ("models", "datasets", "spaces")
LFS_SUFFIXES = {".parquet", ".safetensors", ".bin", ".pt", ".arrow"}
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK_SIZE = 64 * 1024
REPO_ID = r"(?P<repo>[\w.-]+/[\w.-]+)"


class HubError(Exception):
    def __init__(self, status, code, message, headers=None, body=None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}
        self.body = body or {}   # more of the JSON answer, as the Hub's own errors carry


class HubServer(LocalServer):
    def __init__(self, root, token=None, page_size=1000, port=0):
        self.root = Path(root)
        self.token = token
        self.page_size = page_size
        self.fail_downloads = {}   # path in repo -> HTTP status answered to GETs of its bytes
        self.slow_downloads = {}   # path in repo -> seconds slept before each chunk
        self.requests = []         # (method, path) in arrival order
        self.authorizations = []   # the Authorization header of each request (None if absent)
        self.bytes_sent = {}       # (repo id, path in repo) -> bytes of content sent
        self.private = {}          # repo id -> private, for repos created through the API
        self.fail_all = None       # while set: the HTTP status answered to every request
        self.fail_commits = 0      # commits still to be answered with 500
        self.commits = []          # (repo id, summary) of every commit taken
        self.upload_secrets = {}   # LFS sha256 -> the secret its upload URL carries
        self.lock = threading.RLock()
        self._hashes = {}          # (file, size, mtime) -> (sha256, git blob sha1)
        self.serve(_handler_class(self), port)

    @property
    def url(self):
        return self.root_url

    def downloads_of(self, path_in_repo):
        """How many GETs of a file's bytes arrived (any repo, any revision)."""
        with self.lock:
            return sum(1 for method, path in self.requests
                       if method == "GET" and "/resolve/" in path and path.endswith("/" + quote(path_in_repo)))

    # --- repos on disk ---

    def repo_dir(self, repo_type, repo_id):
        directory = self.root / repo_type / repo_id
        if repo_type not in REPO_TYPES or not directory.is_dir():
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return directory

    def files(self, directory):
        """Paths of the repo's files, relative and sorted; git's and our bookkeeping left out."""
        return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*")
                      if path.is_file() and not any(part.startswith(".") for part in
                                                    path.relative_to(directory).parts))

    def hashes(self, file):
        stat = file.stat()
        key = (str(file), stat.st_size, stat.st_mtime_ns)
        with self.lock:
            if key not in self._hashes:
                content = file.read_bytes()
                self._hashes[key] = (hashlib.sha256(content).hexdigest(),
                                     _git_blob_sha1(content))
            return self._hashes[key]

    def commit_sha(self, directory):
        digest = hashlib.sha1()
        for path in self.files(directory):
            digest.update(path.encode() + b"\0" + self.hashes(directory / path)[0].encode())
        return digest.hexdigest()

    def resolve_revision(self, directory, revision):
        sha = self.commit_sha(directory)
        if revision not in ("main", sha):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def is_lfs(self, file):
        return _is_lfs_path(file.name, file.stat().st_size)

    def lfs_object(self, sha256):
        return self.root / ".lfs" / sha256

    def oid_of(self, directory, path):
        """What preupload answers for a file already in the repo: the sha256 of an LFS
        file, the git blob sha1 of a regular one (the client skips unchanged files)."""
        file = directory / path
        if not file.is_file():
            return None
        sha256, blob_sha1 = self.hashes(file)
        return sha256 if self.is_lfs(file) else blob_sha1

    def tree_entry(self, directory, path):
        file = directory / path
        if file.is_dir():
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}
        size = file.stat().st_size
        sha256, blob_sha1 = self.hashes(file)
        entry = {"type": "file", "oid": blob_sha1, "size": size, "path": path}
        if self.is_lfs(file):
            pointer = _lfs_pointer(sha256, size)
            entry["oid"] = _git_blob_sha1(pointer)
            entry["lfs"] = {"oid": sha256, "size": size, "pointerSize": len(pointer)}
        return entry


def _is_lfs_path(name, size):
    return Path(name).suffix in LFS_SUFFIXES or size > LFS_MIN_SIZE


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# --- endpoints ---

def repo_info(hub, request, match):
    directory = hub.repo_dir(match["type"], match["repo"])
    sha = hub.resolve_revision(directory, unquote(match["revision"] or "main"))
    request.send_json({
        "id": match["repo"], "author": match["repo"].split("/")[0], "sha": sha,
        "private": hub.private.get(match["repo"], False), "gated": False, "disabled": False, "tags": [],
        "siblings": [{"rfilename": path} for path in hub.files(directory)],
        "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
    })


def tree(hub, request, match):
    directory = hub.repo_dir(match["type"], match["repo"])
    hub.resolve_revision(directory, unquote(match["revision"]))
    base = unquote(match["path"] or "").strip("/")
    if base and not (directory / base).is_dir():
        raise HubError(404, "EntryNotFound", f"{base} does not exist on this revision")
    query = parse_qs(urlsplit(request.path).query)
    recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
    start = directory / base
    candidates = start.rglob("*") if recursive else start.iterdir()
    paths = sorted(path.relative_to(directory).as_posix() for path in candidates
                   if not any(part.startswith(".") for part in path.relative_to(directory).parts))
    cursor = int(query.get("cursor", ["0"])[0])
    page = [hub.tree_entry(directory, path) for path in paths[cursor:cursor + hub.page_size]]
    headers = {}
    if cursor + hub.page_size < len(paths):
        next_url = (f"{hub.url}{urlsplit(request.path).path}?recursive={str(recursive).lower()}"
                    f"&cursor={cursor + hub.page_size}")
        headers["Link"] = f'<{next_url}>; rel="next"'
    request.send_json(page, headers)


def resolve(hub, request, match):
    repo_type = (match["type"] or "model") + "s"
    directory = hub.repo_dir(repo_type, match["repo"])
    sha = hub.resolve_revision(directory, unquote(match["revision"]))
    path = unquote(match["path"])
    file = directory / path
    if path not in hub.files(directory):
        raise HubError(404, "EntryNotFound", f"{path} does not exist on this revision",
                       {"X-Repo-Commit": sha})
    size = file.stat().st_size
    sha256, blob_sha1 = hub.hashes(file)
    headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
    if hub.is_lfs(file):
        headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(size)})
    else:
        headers["ETag"] = f'"{blob_sha1}"'
    if request.command == "HEAD":
        request.send_bytes_response(200, b"", headers, content_length=size)
        return
    if path in hub.fail_downloads:
        raise HubError(hub.fail_downloads[path], "", f"failing {path} on purpose")
    start, end = 0, size - 1
    range_header = request.headers.get("Range")
    if range_header and (range_match := re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())):
        start = int(range_match[1])
        end = min(int(range_match[2]), size - 1) if range_match[2] else size - 1
        if start >= size:
            raise HubError(416, "", f"range {range_header} outside a file of {size} bytes",
                           {"Content-Range": f"bytes */{size}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    status = 206 if "Content-Range" in headers else 200
    request.send_response(status)
    for name, value in headers.items():
        request.send_header(name, value)
    request.send_header("Content-Length", str(end - start + 1))
    request.end_headers()
    delay = hub.slow_downloads.get(path, 0.0)
    with open(file, "rb") as source:
        source.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            if delay:
                time.sleep(delay)
            chunk = source.read(min(CHUNK_SIZE, remaining))
            request.wfile.write(chunk)
            remaining -= len(chunk)
            with hub.lock:
                key = (match["repo"], path)
                hub.bytes_sent[key] = hub.bytes_sent.get(key, 0) + len(chunk)


# --- the write side ---

def create_repo(hub, request, match):
    payload = json.loads(request.body or b"{}")
    name, owner = payload.get("name"), payload.get("organization")
    if not name or not owner:
        raise HubError(400, "", "this stand-in needs an explicit OWNER/NAME repo id")
    repo_id = f"{owner}/{name}"
    directory = hub.root / f"{payload.get('type') or 'model'}s" / repo_id
    with hub.lock:
        if directory.is_dir():
            # The Hub's answer names the repo too, and huggingface_hub's create_repo(exist_ok=True) reads it.
            raise HubError(409, "", "You already created this model repo", body={"url": f"{hub.url}/{repo_id}"})
        directory.mkdir(parents=True)
        hub.private[repo_id] = payload.get("visibility") == "private" or payload.get("private") is True
    request.send_json({"url": f"{hub.url}/{repo_id}", "name": repo_id})


def preupload(hub, request, match):
    directory = hub.repo_dir(match["type"], match["repo"])
    sha = hub.resolve_revision(directory, unquote(match["revision"]))
    files = []
    for entry in json.loads(request.body)["files"]:
        mode = "lfs" if _is_lfs_path(entry["path"], entry["size"]) else "regular"
        files.append({"path": entry["path"], "uploadMode": mode, "shouldIgnore": False,
                      "oid": hub.oid_of(directory, entry["path"])})
    request.send_json({"files": files, "commitOid": sha})


def lfs_batch(hub, request, match):
    hub.repo_dir((match["type"] or "model") + "s", match["repo"])
    payload = json.loads(request.body)
    if payload.get("operation") != "upload":
        raise HubError(400, "", "this stand-in takes LFS uploads only")
    objects = []
    for entry in payload["objects"]:
        oid, size = entry["oid"], entry["size"]
        stored = hub.lfs_object(oid)
        if stored.is_file() and stored.stat().st_size == size:
            objects.append({"oid": oid, "size": size})   # already there: nothing to send
            continue
        with hub.lock:
            secret = hub.upload_secrets.setdefault(oid, secrets.token_hex(8))
        objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
            "upload": {"href": f"{hub.url}/lfs-upload/{oid}?secret={secret}", "header": {}},
            "verify": {"href": f"{hub.url}/lfs-verify/{oid}", "header": {}}}})
    request.send_json({"transfer": "basic", "objects": objects})


def lfs_upload(hub, request, match):
    oid = match["oid"]
    secret = parse_qs(urlsplit(request.path).query).get("secret", [None])[0]
    with hub.lock:
        if secret is None or hub.upload_secrets.get(oid) != secret:
            raise HubError(403, "", "no such upload")
    if hashlib.sha256(request.body).hexdigest() != oid:
        raise HubError(400, "", f"the bytes sent do not hash to {oid}")
    stored = hub.lfs_object(oid)
    stored.parent.mkdir(parents=True, exist_ok=True)
    temporary = stored.with_name(f".{oid}.{threading.get_ident()}.tmp")
    temporary.write_bytes(request.body)
    os.replace(temporary, stored)
    request.send_bytes_response(200, b"")


def lfs_verify(hub, request, match):
    payload = json.loads(request.body)
    stored = hub.lfs_object(match["oid"])
    if not stored.is_file() or stored.stat().st_size != payload.get("size"):
        raise HubError(404, "", f"LFS object {match['oid']} was not uploaded")
    request.send_json({"success": True})


def commit(hub, request, match):
    directory = hub.repo_dir(match["type"], match["repo"])
    hub.resolve_revision(directory, unquote(match["revision"]))
    lines = [json.loads(line) for line in request.body.decode("utf-8").splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "", "a commit starts with a header line")
    with hub.lock:
        if hub.fail_commits > 0:
            hub.fail_commits -= 1
            raise HubError(500, "", "failing this commit on purpose")
        changes = [_checked_change(hub, directory, line) for line in lines[1:]]
        for kind, path, content in changes:
            _apply_change(directory, kind, path, content)
        hub.commits.append((match["repo"], lines[0]["value"].get("summary")))
        sha = hub.commit_sha(directory)
    request.send_json({"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{match['repo']}/commit/{sha}",
                       "pullRequestUrl": None})


def _checked_change(hub, directory, line):
    """(kind, path, bytes or None) for one commit line, or the Hub's error for it."""
    key, value = line.get("key"), line.get("value", {})
    path = value.get("path", "").rstrip("/")
    if not path or path.startswith("/") or ".." in path.split("/"):
        raise HubError(400, "", f"invalid path {path!r}")
    if key == "file":
        if value.get("encoding") != "base64":
            raise HubError(400, "", "regular files come base64-encoded")
        return "write", path, base64.b64decode(value["content"])
    if key == "lfsFile":
        stored = hub.lfs_object(value.get("oid", ""))
        if not stored.is_file() or ("size" in value and stored.stat().st_size != value["size"]):
            raise HubError(422, "", f"{path}: LFS object {value.get('oid')} was never uploaded")
        return "write", path, stored.read_bytes()
    if key == "deletedFile":
        if not (directory / path).is_file():
            raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
        return "delete", path, None
    if key == "deletedFolder":
        if not (directory / path).is_dir():
            raise HubError(404, "EntryNotFound", f"A folder with this name doesn't exist: {path}")
        return "delete", path, None
    raise HubError(400, "", f"this stand-in does not take {key!r} lines")


def _apply_change(directory, kind, path, content):
    target = directory / path
    if kind == "write":
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_bytes(content)
        os.replace(temporary, target)
        return
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    parent = target.parent   # git has no empty folders
    while parent != directory and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


ROUTES = [
    ("GET", re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{REPO_ID}(?:/revision/(?P<revision>[^/]+))?$"),
     repo_info),
    ("GET", re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{REPO_ID}/tree/(?P<revision>[^/]+)(?P<path>/.*)?$"),
     tree),
    ("HEAD", re.compile(rf"^/(?:(?P<type>dataset|space)s/)?{REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"),
     resolve),
    ("GET", re.compile(rf"^/(?:(?P<type>dataset|space)s/)?{REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"),
     resolve),
    ("POST", re.compile(r"^/api/repos/create$"), create_repo),
    ("POST", re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{REPO_ID}/preupload/(?P<revision>[^/]+)$"),
     preupload),
    ("POST", re.compile(rf"^/(?:(?P<type>dataset|space)s/)?{REPO_ID}\.git/info/lfs/objects/batch$"), lfs_batch),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), lfs_upload),
    ("POST", re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$"), lfs_verify),
    ("POST", re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{REPO_ID}/commit/(?P<revision>[^/]+)$"), commit),
]


def _handler_class(hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub

        def log_message(self, *args):
            pass

        def send_bytes_response(self, status, body, headers=None, content_length=None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def send_json(self, data, headers=None):
            self.send_bytes_response(200, json.dumps(data).encode(),
                                     {"Content-Type": "application/json", **(headers or {})})

        def read_body(self):
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = bytearray()
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():   # trailer lines, then the blank one
                pass
            return bytes(body)

        def dispatch(self):
            path = urlsplit(self.path).path
            # Read any request body, so the connection stays usable for the next request.
            self.body = self.read_body()
            with hub.lock:
                hub.requests.append((self.command, path))
                hub.authorizations.append(self.headers.get("Authorization"))
            try:
                if hub.fail_all is not None:
                    raise HubError(hub.fail_all, "", "failing every request on purpose")
                # LFS uploads go to storage by a secret URL, without the Hub token (as to S3).
                if (hub.token is not None and not path.startswith("/lfs-upload/")
                        and self.headers.get("Authorization") != f"Bearer {hub.token}"):
                    raise HubError(401, "RepoNotFound", "Invalid username or password.")
                for method, pattern, handler in ROUTES:
                    if method == self.command and (match := pattern.match(path)):
                        handler(hub, self, match)
                        return
                raise HubError(404, "", f"no route for {self.command} {path}")
            except HubError as error:
                headers = {"Content-Type": "application/json", "X-Error-Message": str(error),
                           **error.headers}
                if error.code:
                    headers["X-Error-Code"] = error.code
                self.send_bytes_response(error.status, json.dumps({"error": str(error), **error.body}).encode(),
                                         headers)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = dispatch

    return Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="directory holding datasets/OWNER/NAME/..., models/..., spaces/...")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default=None)
    arguments = parser.parse_args()
    server = HubServer(arguments.root, token=arguments.token, port=arguments.port).start()
    print(f"serving {arguments.root} at {server.url}; set HF_ENDPOINT={server.url}")
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()
