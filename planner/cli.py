"""The `chunkft` command line: one subcommand per job, each defined in its own module.

Every subcommand module exposes `add_parser(subparsers)` and a `run(args) -> int`. A
`ChunkftError` (bad input) becomes one line on stderr and exit status 2; an infeasible
budget is an answer and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from planner.errors import ChunkftError

# subcommand -> module that implements it (imported lazily: `chunkft fit` must start fast).
SUBCOMMANDS: dict[str, str] = {
    "fit": "planner.fit",
    "plan": "planner.plan_cli",
    "simulate": "planner.plan_cli",
    "size": "planner.size_cli",
    "compare": "analysis.cli",
    "report": "analysis.cli",
    "run": "runtime.run_cli",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"chunkft: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chunkft", description="Memory-budget planner and runtime for full fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except ChunkftError as e:
        print(f"chunkft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chunkft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
