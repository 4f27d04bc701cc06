"""A stand-in for the raw.githubusercontent.com file that instruction-data.json is
downloaded from: one payload at /instruction-data.json on 127.0.0.1, anything else 404;
`requests` counts the GETs."""

from http.server import BaseHTTPRequestHandler

try:
    from servers.local_server import LocalServer
except ImportError:  # run as a script (python tests/servers/NAME.py): its folder is on sys.path
    from local_server import LocalServer


class FileServer(LocalServer):
    def __init__(self, payload, port=0):
        self.payload, self.requests = payload, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests += 1
                if self.path != "/instruction-data.json":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                self.wfile.write(outer.payload)

        self.serve(Handler, port)
        self.url = f"{self.root_url}/instruction-data.json"
