"""``elastic-rendezvous``: run the embedded rendezvous server as its own process.

    elastic-rendezvous serve --port 29400 --token-file /etc/elastic/token
    elastic-rendezvous serve --host 0.0.0.0 --port 29400 --tls-cert c.pem --tls-key k.pem

The token may also come from $ELASTIC_RDZV_TOKEN or $ELASTIC_RDZV_TOKEN_FILE (better than
``--token``, which other users can read in the process list). Without any token the server
accepts only loopback clients. Prints ``elastic-rendezvous listening on HOST:PORT`` once ready
(``--port 0`` picks a free port) and serves until SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .commands import run_command
from .errors import ConfigError
from .store.embedded_server import DEFAULT_PORT, EmbeddedServer

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastic-rendezvous",
        description="The embedded rendezvous server of elastic-run (length-prefixed JSON over "
                    "TCP, shared-token challenge-response, optional TLS).")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server until SIGTERM/SIGINT")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port to listen on; 0 picks a free one (default {DEFAULT_PORT})")
    tokens = serve.add_mutually_exclusive_group()
    tokens.add_argument("--token", help="shared secret clients must prove they hold")
    tokens.add_argument("--token-file", help="file holding the shared secret")
    serve.add_argument("--tls-cert", help="PEM certificate: serve TLS")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-ca", help="PEM CA bundle: require client certificates it signed")
    serve.add_argument("--auth-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="drop clients that do not finish the handshake in time (default 5)")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command("elastic-rendezvous", lambda: _serve(args))


def _serve(args) -> int:
    if not 0 <= args.port < 65536:
        raise ConfigError(f"invalid port {args.port}")
    conf = {"token": args.token, "token_file": args.token_file, "tls_cert": args.tls_cert,
            "tls_key": args.tls_key, "tls_ca": args.tls_ca, "auth_timeout_s": args.auth_timeout}
    server = EmbeddedServer.from_conf(args.host, args.port, **conf)
    server.serve_forever(on_ready=_announce)  # a failure to listen: a StoreError, exit 1
    return 0


def _announce(server: EmbeddedServer) -> None:
    tls = " (TLS)" if server.ssl else ""
    auth = "token required" if server.token is not None else "no token: loopback clients only"
    print(f"elastic-rendezvous listening on {server.host}:{server.port}{tls}; {auth}", flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
