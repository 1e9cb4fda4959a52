"""A static HTTPS file server standing in for the public probe bucket in
the end-to-end tests: serves DIR over TLS on a free loopback port and
prints "listening on PORT" once it accepts connections.

    python3 https_bucket.py DIR CERT KEY [--endless BYTES] [--log FILE]

With --endless, a hostile bucket: every GET of a probe (`*.o.gz`) is
answered 200 with BYTES zero bytes, chunked, without a Content-Length.
With --log, each request's method and path is appended to FILE, a line
each, so that a test can count what was asked.
"""

import functools
import http.server
import ssl
import sys

from tls_server import serve_tls


class Logged(http.server.SimpleHTTPRequestHandler):
    log_file = ""

    def log_request(self, code="-", size="-") -> None:
        if self.log_file:
            with open(self.log_file, "a") as log:
                log.write(f"{self.command} {self.path}\n")


class Endless(Logged):
    protocol_version = "HTTP/1.1"
    size = 0

    def do_GET(self) -> None:
        if not self.path.endswith(".o.gz"):
            super().do_GET()
            return
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = bytes(1 << 20)
        try:
            for _ in range(self.size >> 20):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass


def main() -> None:
    directory, cert, key = sys.argv[1:4]
    options = dict(zip(sys.argv[4::2], sys.argv[5::2]))
    Logged.log_file = options.get("--log", "")
    handler = functools.partial(Logged, directory=directory)
    if "--endless" in options:
        Endless.size = int(options["--endless"])
        handler = functools.partial(Endless, directory=directory)
    serve_tls(handler, cert, key)


if __name__ == "__main__":
    main()
