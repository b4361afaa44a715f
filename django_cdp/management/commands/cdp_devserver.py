"""``manage.py cdp_devserver``: a local RudderStack data plane that prints what arrives.

Point ``DJANGO_CDP["DATA_PLANE_URL"]`` at it (``http://127.0.0.1:8787``) with the
same write key, run ``cdp_deliver`` or a worker, and watch each message as the
real gateway would see it, including its refusals (401, 400, 413).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_cdp.devserver import DataPlaneServer
from django_cdp.management.base import CdpCommand, port
from django_cdp.transport import mask

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787


def is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (OSError, ValueError):
        return False


class Command(CdpCommand):
    database_help = None
    help = "Run a local data plane (RudderStack HTTP API) that checks and prints incoming messages."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--host",
            default=None,
            help=f"Address to listen on (default {DEFAULT_HOST}; other than loopback only "
            "when given here explicitly).",
        )
        parser.add_argument(
            "--port",
            type=port,
            default=DEFAULT_PORT,
            help=f"Port to listen on (default {DEFAULT_PORT}; 0: any free port).",
        )
        parser.add_argument(
            "--write-key",
            default=None,
            help="Accept only this write key (401 otherwise, as rudder-server). "
            "Default: any non-empty key.",
        )
        parser.add_argument("--json", action="store_true", help="Print each message as full JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        host = options["host"] or DEFAULT_HOST
        if options["host"] is None and not is_loopback(host):
            raise CommandError(f"refusing to listen on non-loopback {host} without --host")
        try:
            server = DataPlaneServer(
                host,
                options["port"],
                write_key=options["write_key"],
                out=self.stdout,
                print_json=options["json"],
            )
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{options['port']}: {exc}") from exc
        key = options["write_key"]
        self.stdout.write(
            f"django-cdp devserver on {server.url} (POST /v1/batch, /v1/track, /v1/identify); "
            f"write key: {mask(key, key) if key else 'any'}; Ctrl-C to stop"
        )
        if not is_loopback(host):
            self.stderr.write(f"warning: listening on {host}, reachable from other machines")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
