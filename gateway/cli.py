"""The ``voxgate`` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    del sub
    args = parser.parse_args(argv)
    del args
    return 0
