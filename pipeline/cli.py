"""The ``pinsage`` command line: one subcommand per stage plus ``run`` (every stage end to end).

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)`` which adds its subcommand and sets
``func`` (``args -> int``). User errors print one line ``pinsage <cmd>: error: ...`` and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline import __version__
from pipeline.rundir import StageError

COMMAND_MODULES: tuple[str, ...] = (  # one line per stage module, in pipeline order
    "pipeline.generate",
    "pipeline.ingest",
    "pipeline.split",
    "pipeline.graph",
    "pipeline.walks",
    "pipeline.partition",
    "pipeline.train",
    "pipeline.infer",
    "pipeline.evaluate",
    "pipeline.recommend",
    "pipeline.update",
    "pipeline.run",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pinsage", description="PinSage++: Dask GNN recommender pipeline")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, StageError, UnicodeDecodeError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"pinsage {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pinsage {args.command}: interrupted; finished stages are kept, partial ones removed",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
