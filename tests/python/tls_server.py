"""Serves an HTTP request handler over TLS on a free loopback port, for the
test servers of this directory: prints "listening on PORT" (the line the
Rust test that started it waits for), then serves until killed."""

import http.server
import ssl


def serve_tls(handler, cert: str, key: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()
