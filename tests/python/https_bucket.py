"""A static HTTPS file server standing in for the public probe bucket in
the end-to-end tests: serves DIR over TLS on a free loopback port and
prints "listening on PORT" once it accepts connections.

    python3 https_bucket.py DIR CERT KEY [--endless BYTES]

With --endless, a hostile bucket: every GET of a probe (`*.o.gz`) is
answered 200 with BYTES zero bytes, chunked, without a Content-Length.
"""

import functools
import http.server
import ssl
import sys


class Endless(http.server.SimpleHTTPRequestHandler):
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
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    if sys.argv[4:5] == ["--endless"]:
        Endless.size = int(sys.argv[5])
        handler = functools.partial(Endless, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
