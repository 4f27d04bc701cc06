"""What every stand-in server here shares: an HTTP server on 127.0.0.1 in a background
thread, started and stopped as a context manager (or by hand with start/stop)."""

import sys
import threading
from http.server import ThreadingHTTPServer


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hung up (a test interrupting a download, a cancelled run) is no
        # failure of the server.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LocalServer:
    """Subclasses call serve(handler_class, port) in __init__; port 0 picks a free one."""

    def serve(self, handler_class, port=0):
        self.httpd = QuietServer(("127.0.0.1", port), handler_class)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def root_url(self):
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
