"""A stand-in for the upload side of the Hugging Face Hub's HTTP API, on 127.0.0.1.

Speaks what `huggingface_hub`'s `create_repo` and `upload_folder` send (point the
client at it with HF_ENDPOINT):

    POST /api/repos/create                       {"name", "organization", "visibility"?}
    POST /api/validate-yaml                      the README.md front matter check
    POST /api/models/OWNER/NAME/preupload/REV    how each file is to be sent
    POST /api/models/OWNER/NAME/commit/REV       ndjson: a header, then one line per file
    GET  /api/models/OWNER/NAME                  repo info
    GET  /api/agent-harnesses                    the client's telemetry registry (empty here)

Preupload answers "regular" for every file, the Hub's mode for small text files: the
client then puts each file's bytes, base64, in the commit itself, so no LFS or Xet
storage is involved. A commit with anything else (an LFS pointer, a deletion) is
refused with 400, so a client that took another path fails loudly.

Requests must carry `Authorization: Bearer TOKEN`; any other token gets 401.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler

try:
    from servers.local_server import LocalServer
except ImportError:  # run as a script (python tests/servers/NAME.py): its folder is on sys.path
    from local_server import LocalServer

REPO_PATH = re.compile(r"^/api/models/([\w.-]+/[\w.-]+)(?:/(preupload|commit)/([^/?]+))?$")


class HubUploadServer(LocalServer):
    def __init__(self, token, port=0):
        self.token = token
        self.repos = {}      # repo id -> {"private": bool, "files": {path: bytes}, "commits": [summary]}
        self.requests = []   # (method, path) in arrival order
        self.authorizations = set()
        self.lock = threading.Lock()
        self.serve(self._handler_class(), port)

    @property
    def url(self):
        return self.root_url

    # --- the API, one method per endpoint; each returns (status, JSON body) ---

    def create_repo(self, payload):
        name, organization = payload.get("name"), payload.get("organization")
        if not name or not organization:
            return 400, {"error": "this stand-in needs an explicit owner/name repo id"}
        repo_id = f"{organization}/{name}"
        with self.lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = {"private": payload.get("visibility") == "private",
                                   "files": {}, "commits": []}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def preupload(self, repo_id, payload):
        files = [{"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for entry in payload.get("files", [])]
        return 200, {"files": files, "commitOid": self._head(repo_id)}

    def commit(self, repo_id, body):
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "commit payload must start with a header line"}
        added = {}
        for line in lines[1:]:
            if line.get("key") != "file" or line["value"].get("encoding") != "base64":
                return 400, {"error": f"this stand-in takes regular files only, got {line.get('key')}"}
            added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        with self.lock:
            repo = self.repos[repo_id]
            repo["files"].update(added)
            repo["commits"].append(lines[0]["value"].get("summary"))
            oid = self._head(repo_id)
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}

    def repo_info(self, repo_id):
        repo = self.repos[repo_id]
        return 200, {"id": repo_id, "modelId": repo_id, "private": repo["private"],
                     "sha": self._head(repo_id),
                     "siblings": [{"rfilename": path} for path in sorted(repo["files"])]}

    def _head(self, repo_id):
        """A commit id that changes with the repo's content."""
        digest = hashlib.sha1(repo_id.encode())
        for path, content in sorted(self.repos[repo_id]["files"].items()):
            digest.update(path.encode() + b"\0" + hashlib.sha1(content).digest())
        return digest.hexdigest()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body, error_code=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                    self.send_header("X-Error-Message", body.get("error", ""))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self):
                authorization = self.headers.get("Authorization", "")
                server.authorizations.add(authorization)
                return authorization == f"Bearer {server.token}"

            def _route(self, method):
                path = self.path.split("?", 1)[0]
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.lock:
                    server.requests.append((method, path))
                if method == "GET" and path == "/api/agent-harnesses":  # public, best-effort
                    return self._reply(200, {"standardEnvVars": [], "harnesses": {}})
                if not self._authorized():
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if method == "POST" and path == "/api/repos/create":
                    return self._reply(*server.create_repo(json.loads(body)))
                if method == "POST" and path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                match = REPO_PATH.match(path)
                if match is None:
                    return self._reply(404, {"error": f"no such endpoint: {method} {path}"})
                repo_id, action, revision = match.groups()
                if repo_id not in server.repos:
                    return self._reply(404, {"error": "Repository not found"}, "RepoNotFound")
                if revision not in (None, "main"):
                    return self._reply(404, {"error": f"Revision {revision} not found"}, "RevisionNotFound")
                if method == "GET" and action is None:
                    return self._reply(*server.repo_info(repo_id))
                if method == "POST" and action == "preupload":
                    return self._reply(*server.preupload(repo_id, json.loads(body)))
                if method == "POST" and action == "commit":
                    return self._reply(*server.commit(repo_id, body))
                return self._reply(405, {"error": f"{method} not allowed on {path}"})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

        return Handler
