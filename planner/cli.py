"""The `chunkft` command line: one subcommand per job, each defined in its own module.

Every subcommand module exposes `add_parser(subparsers)` and a `run(args) -> int`. A
`ChunkftError` (bad input) becomes one line on stderr and exit status 2; an infeasible
budget is an answer and exits 1.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import gc
import importlib
import logging
import os
import select
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
    "cache": "planner.cache",
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


# Write errors that are the machine's state, not a bug: one line, exit 2, not a traceback.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.EDQUOT,
                           errno.EACCES, errno.EPERM, errno.ENAMETOOLONG})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = _subparser(parser, argv)
    if sub is not None:
        argv = _attach_dash_values(sub, argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(_unrecognized(sub, args, extra))
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "from_file", None):  # --from: the user's own training config (planner.importers)
            from planner.importers import apply_import, describe

            print(describe(apply_import(args, sub)), file=sys.stderr)
        return int(args.run(args) or 0)
    except ChunkftError as e:
        print(f"chunkft: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader closed stdout (`chunkft fit | head`): stop quietly, as cat does
        if not _stdout_closed():
            raise  # another pipe or socket (a worker, a process group): a real error
        _stdout_to_devnull()
        return 141
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        where = f" {e.filename!r}" if e.filename else ""
        print(f"chunkft: error: cannot write{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chunkft: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors' own I/O error (a full disk)
            raise
        print(f"chunkft: error: cannot write safetensors file: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    """The subcommand's parser, if argv names one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and argv and argv[0] in action.choices:
            return action.choices[argv[0]]
    return None


def _attach_dash_values(sub: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--gpu -1GiB` -> `--gpu=-1GiB`: argparse takes a value starting with "-" for an option
    and says "expected one argument" without naming the value; attached, the value reaches
    its own check, whose message names it and what is valid. A following token that is (a
    prefix of) a known option is left alone: then the value really is missing."""
    takes_value = {opt for a in sub._actions if a.option_strings and a.nargs is None
                   and isinstance(a, argparse._StoreAction) for opt in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok in takes_value and nxt is not None and nxt.startswith("-") and nxt != "-" \
                and not _names_option(sub, nxt):
            out.append(f"{tok}={nxt}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def _names_option(sub: argparse.ArgumentParser, tok: str) -> bool:
    head = tok.split("=", 1)[0]
    return any(opt == head or (head.startswith("--") and opt.startswith(head)) for opt in sub._option_string_actions)


def _unrecognized(sub: argparse.ArgumentParser | None, args, extra: list[str]) -> str:
    """One line: what was not understood and the valid options of that command."""
    bad = extra[0]
    if sub is None:
        return f"unrecognized argument {bad!r}; give a command first: {', '.join(SUBCOMMANDS)}"
    options = sorted({a.option_strings[-1] for a in sub._actions if a.option_strings} - {"--help"})
    if not bad.startswith("-"):
        return (f"unexpected argument {bad!r} for `chunkft {args.command}`; its options are: "
                f"{', '.join(options)}")
    close = difflib.get_close_matches(bad.split("=", 1)[0], options, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (f"unrecognized option {bad!r} for `chunkft {args.command}`{hint}; valid options are: "
            f"{', '.join(options)}")


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader is gone (poll reports an error on its write end)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError):  # no real stdout, or no poll (Windows)
        return not hasattr(select, "poll")
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of a closed pipe raises nothing."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a caller (tests capture it in memory)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


# The planner's commands: pure computation in this one process, every file they write is complete
# (renamed into place) and every cache bucket flushed before main() returns.
PLANNING = frozenset({"fit", "plan", "simulate", "size", "cache"})
# A planning run makes ~10^6 small objects (allocator blocks, op records), most reclaimed by
# reference counting; Python's default gen-0 threshold (700) then re-scans them for cycles
# thousands of times: a cold `size llama3-70b` spent ~1.5 s of its ~17 s there.
PLANNING_GC_THRESHOLD = (50_000, 20, 100)
# Import-time warnings from libraries about parts the planner never runs: torchao's optional
# CUDA kernels that do not load in a CPU build ("Failed to load ..._C_cutlass_90a.abi3.so") and
# torch's note to torchao about registering enums with pytree. Shown on every cold planning run,
# they read as a broken install; errors still show.
PLANNING_QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def entry(argv: list[str] | None = None) -> None:
    """The `chunkft` console script (and `python -m planner.cli`): main(), tuned for a short process.

    For the planner's commands: a sparser cyclic garbage collector, the import-time warnings of
    PLANNING_QUIET_LOGGERS not shown, and once the answer is printed the process ends with
    os._exit: the interpreter's teardown of torch and transformers (~0.6 s, nothing left to
    write) is skipped. Other commands (run, compare, report: threads, worker processes) end
    normally. Answers are the same either way; main() itself (what tests
    and benchmarks call in process) changes nothing global."""
    argv = list(sys.argv[1:] if argv is None else argv)
    planning = bool(argv) and argv[0] in PLANNING
    if planning:
        gc.set_threshold(*PLANNING_GC_THRESHOLD)
        for name in PLANNING_QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    code = main(argv)
    if not planning:
        sys.exit(code)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader closed stdout after the last print
        code = code or 141
    except ValueError:  # stdout already closed
        pass
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
