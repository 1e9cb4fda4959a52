"""A registry token server for the end-to-end tests (the Bearer flow of
the distribution spec): on GET of any path with the expected Basic
credentials it answers {"token": TOKEN}, else 401. TLS on a free loopback
port; prints "listening on PORT" once it accepts connections.

    python3 token_server.py CERT KEY TOKEN_FILE EXPECTED_AUTHORIZATION
"""

import http.server
import json
import sys

from tls_server import serve_tls


def main() -> None:
    cert, key, token_file, expected = sys.argv[1:5]
    token = open(token_file).read().strip()

    class Tokens(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.headers.get("Authorization") == expected and "scope=repository" in self.path:
                body, status = json.dumps({"token": token}).encode(), 200
            else:
                body, status = b'{"errors": [{"code": "UNAUTHORIZED"}]}', 401
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    serve_tls(Tokens, cert, key)


if __name__ == "__main__":
    main()
