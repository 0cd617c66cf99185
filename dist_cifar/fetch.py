"""`python -m dist_cifar.fetch [DATA_DIR]` (`dist-cifar-fetch`): make sure DATA_DIR holds CIFAR-10,
downloading and extracting it when missing. The download itself is download.py's."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data import DataError, find_cifar10


def main(argv: list[str] | None = None) -> int:
    """Make sure DATA_DIR holds CIFAR-10 (download + extract when missing); one line on stderr and
    exit 1 when it cannot."""
    parser = argparse.ArgumentParser(prog="dist-cifar-fetch", description=main.__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default="data")
    args = parser.parse_args(argv)
    try:
        print(find_cifar10(Path(args.data_dir), download=True))
    except DataError as exc:
        print(f"dist-cifar-fetch: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
