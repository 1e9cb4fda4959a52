"""A static HTTPS file server standing in for the public probe bucket in
the end-to-end tests: serves DIR over TLS on a free loopback port and
prints "listening on PORT" once it accepts connections.

    python3 https_bucket.py DIR CERT KEY
"""

import functools
import http.server
import ssl
import sys


def main() -> None:
    directory, cert, key = sys.argv[1:4]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
