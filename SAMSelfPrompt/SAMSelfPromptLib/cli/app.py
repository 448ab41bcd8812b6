"""`samselfprompt app [INPUT]`: serve the web app (trame-slicer) on this computer.

It listens on 127.0.0.1 unless ``--host`` says otherwise; the app has no authentication, so
binding to another address prints a warning. The web app (and trame) is imported only when the
command runs.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import InputError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "app", help="serve the web app: Auto-segment, click corrections and export in a browser",
        description="Serve the SAM-SP web app (trame-slicer). Without INPUT it opens the built-in sample.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="DICOM folder, volume file (.nii.gz, .nrrd, ...) or 2D picture (.png, .jpg, ...)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port; default 8080)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this computer only). Anything else exposes the app, "
                        "which has no authentication, to the network")
    p.add_argument("--open", action="store_true", help="open the app in the default browser")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a port number (0-65535)")
    if args.host not in LOCAL_HOSTS:
        print(f"WARNING: serving on {args.host}:{args.port}. The app has no authentication: anyone who can reach "
              "this address can see the loaded images and run the model. Bind to 127.0.0.1 unless this network "
              "is trusted.", file=sys.stderr, flush=True)
    from ..app.server import serve

    return serve(args.inputs, host=args.host, port=args.port, open_browser=args.open)
