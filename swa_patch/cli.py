"""The ``swa-patch`` command.  Each feature module contributes one sub-command through an
``add_cli(subparsers)`` function that sets ``func`` on its parser."""
from __future__ import annotations

import argparse
import importlib
import logging

COMMAND_MODULES = [
    # one line per feature module; each defines add_cli(subparsers)
    "swa_patch.receptive",
    "swa_patch.streaming",
    "swa_patch.retrieval",
    "swa_patch.export",
    "swa_patch.commands",
    "swa_patch.calibration",
    "swa_patch.ruler",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swa-patch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
