"""`python -m agent --listen 127.0.0.1:0 [--enable-faults] ...`"""

from __future__ import annotations

import argparse
import sys

from aiproxy.agent import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent", description=cli.DESCRIPTION)
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
