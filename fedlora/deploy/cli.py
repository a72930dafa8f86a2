"""`fedlora certs`, `fedlora server` and `fedlora client`: the deployment commands."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.errors import FedloraError
from fedlora.interrupt import interrupt_bounded

if TYPE_CHECKING:
    from fedlora.deploy.settings import SiteSettings


def add_deploy_commands(sub) -> None:
    certs = sub.add_parser(
        "certs",
        help="make a federation's CA, the server's TLS certificate and site keys",
        description="Create (in DIR) the federation CA if there is none, the server's TLS "
        "certificate for the names and IPs the sites dial, and a node-authentication key pair "
        "per site. Private keys are written 0600; existing files are never overwritten "
        "without --force. The layout is described in server/README.md.",
    )
    certs.add_argument("dir", metavar="DIR", help="folder of the federation's key material")
    certs.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="HOST",
        help="a host name the sites use for the server (repeatable)",
    )
    certs.add_argument(
        "--server-ip",
        action="append",
        default=[],
        metavar="IP",
        help="an IP address the sites use for the server (repeatable)",
    )
    certs.add_argument(
        "--site", action="append", default=[], metavar="NAME", help="a site (repeatable)"
    )
    certs.add_argument("--days", type=int, default=825, help="days the server certificate is valid")
    certs.add_argument(
        "--force",
        action="store_true",
        help="replace the server certificate / the named sites' keys (key rotation)",
    )

    server = sub.add_parser(
        "server",
        help="run a federation's aggregation server (Flower SuperLink) for the listed sites",
        description="Serve the federation in server.toml to the sites in its [sites] over TLS "
        "with node authentication, and write the same results folder as `fedlora simulate`. "
        "With --revoke, revoke site keys instead and exit.",
    )
    server.add_argument("--config", required=True, help="server.toml (see server/)")
    server.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted federation whose state is in <run.out>.partial",
    )
    server.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no node authentication (closed-network rehearsals only)",
    )
    server.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a federation config key, e.g. --set federation.rounds=10 (repeatable)",
    )
    server.add_argument(
        "--revoke",
        action="append",
        default=[],
        metavar="NAME",
        help="revoke the registered key of site NAME for good, then exit without serving "
        "(repeatable); the site can come back only with a new key pair. A site merely left out "
        "of [sites] keeps its key and takes no part",
    )

    client = sub.add_parser(
        "client",
        help="run one site's daemon (Flower SuperNode) that trains on the site's own data",
        description="Connect this site to its federation's server and train on the site's own "
        "data file whenever the server asks; every update sent is recorded in the audit log. "
        "Stops cleanly on SIGTERM.",
    )
    client.add_argument("--config", required=True, help="site.toml (see clients/)")
    client.add_argument(
        "--spent",
        action="store_true",
        help="print what this site's rows have spent (epsilon per federation and over all, "
        "from its privacy ledger) and exit",
    )
    client.add_argument(
        "--delta",
        type=float,
        default=0.0,
        help="with --spent: epsilon at this delta (default: the delta each release recorded)",
    )


def cmd_certs(args: argparse.Namespace) -> int:
    from fedlora.secure.certs import Layout, make_certs
    from fedlora.secure.identity import fingerprint

    issued = make_certs(
        Path(args.dir).expanduser(),
        server_names=args.server_name,
        server_ips=args.server_ip,
        sites=args.site,
        days=args.days,
        force=args.force,
    )
    for path in issued.written:
        print(f"wrote  {path}")
    for path in issued.reused:
        print(f"kept   {path}")
    if args.site:
        print(
            "\nEach site's key fingerprint, for the other sites' [peers] in their site.toml "
            "(send it to them yourself, not only through the server's operator):"
        )
    for name in args.site:
        key = Layout(Path(args.dir).expanduser()).site_public_key(name).read_bytes()
        print(f'{name} = "{fingerprint(key)}"')
    return 0


def _line_buffered() -> None:
    """Daemons write to a journal or a file: every line should be there when it is printed."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def cmd_server(args: argparse.Namespace) -> int:
    from fedlora.deploy.settings import load_server

    _line_buffered()

    if args.revoke and args.insecure:
        raise FedloraError("--revoke acts on registered site keys; --insecure uses none.")
    if args.revoke and args.resume:
        raise FedloraError(
            "--revoke only revokes and exits: run it first, then start the server with --resume."
        )
    settings, cfg = load_server(Path(args.config).expanduser(), args.set, args.insecure)
    if args.revoke:
        from fedlora.deploy.server import revoke

        revoke(settings, args.revoke)
        return 0
    # SIGTERM (systemctl stop) ends the server like Ctrl-C: the partial results and the saved
    # state are kept for --resume; and it ends within seconds even where the interrupt is lost
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt_bounded)
    from fedlora.deploy.server import serve

    out = serve(settings, cfg, insecure=args.insecure, resume=args.resume)
    print(f"\nResults: {out}")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from fedlora.data import check_data_file
    from fedlora.deploy.settings import load_site
    from fedlora.deploy.site import run_site

    _line_buffered()
    settings = load_site(Path(args.config).expanduser())
    if args.spent:
        return print_spent(settings, args.delta)
    # a broken data file is found now, before the site joins and the server counts on it
    for key in ("path", "test_path"):
        if settings.data.get(key):
            check_data_file(Path(settings.data[key]))
    return run_site(settings)


def print_spent(settings: SiteSettings, delta: float) -> int:
    from fedlora.privacy.ledger import PrivacyLedger, spent_report

    if not 0 <= delta < 1:
        raise FedloraError(f"--delta must be between 0 and 1 (got {delta:g}).")
    ledger = PrivacyLedger(settings.ledger)
    print(f"Site {settings.name}. " + spent_report(ledger, settings.policy.max_epsilon, delta))
    return 0


DEPLOY_COMMANDS = {"certs": cmd_certs, "server": cmd_server, "client": cmd_client}
