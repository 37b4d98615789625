"""The `epmoe` command: `epmoe demo` (the main job), `epmoe bench` (benchmarks), `epmoe plan` (EPLB planner),
`epmoe simulate` (EPLB at any EP size, replayed from a load trace).

Error handling lives here, for every subcommand: a usage mistake (argparse, `UsageError`, or a ValueError /
TypeError / OSError raised by the library on the user's input) prints one line `epmoe <cmd>: error: ...` on
stderr and exits 2; any other exception prints one line and exits 1. No traceback unless `--debug` is given.
Common options of every subcommand: `-q/--quiet` (no progress output), `-v/--verbose` (the library's INFO log
lines: rebalances, EP setup, ...), `--debug` (tracebacks and DEBUG log lines).
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_USAGE = 2
EXIT_FAILURE = 1
_USER_ERRORS = (ValueError, TypeError, OSError)


class UsageError(Exception):
    """A user mistake (bad option, option combination, input file): the CLI reports it in one line, exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for options with a real default (not None, not a False flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors: `PROG: error: MESSAGE (see 'PROG --help')`, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(minimum: int):
    """An argparse type: an int >= minimum, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _add_common_options(parser: argparse.ArgumentParser, default) -> None:
    """-q / -v / --debug; subcommands get them with default=SUPPRESS so `epmoe --debug plan` and
    `epmoe plan --debug` both work (a subparser default would overwrite the top-level value)."""
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress output")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show the library's INFO log lines (rebalances, EP group setup)")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks and DEBUG log lines")


def _version() -> str:
    import torch

    import epmoe

    cuda = "yes" if epmoe.has_cuda_kernels() else "no"
    return f"epmoe {epmoe.__version__} (torch {torch.__version__}, CUDA kernels: {cuda})"


def _commands() -> list:
    """The modules that define a subcommand (each has add_parser(subparsers) setting `func`)."""
    from epmoe import bench, demo
    from epmoe.eplb import cli as plan_cli
    from epmoe.eplb import simulator as simulate_cli

    return [demo, bench, plan_cli, simulate_cli]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="epmoe", description="Expert Parallelism for Mixture-of-Experts models")
    parser.add_argument("--version", action="version", version=_version())
    _add_common_options(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in _commands():
        module.add_parser(subparsers)
    for sub in subparsers.choices.values():
        _add_common_options(sub, default=argparse.SUPPRESS)
    return parser


def log_level(args: argparse.Namespace) -> int:
    """The `epmoe` logger level the common options ask for."""
    if getattr(args, "debug", False):
        return logging.DEBUG
    if getattr(args, "verbose", False):
        return logging.INFO
    return logging.ERROR if getattr(args, "quiet", False) else logging.WARNING


def error_message(exc: BaseException) -> str:
    """One line describing `exc`: OSError as 'reason: file', a worker's error as its last traceback line."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip()
    if "Traceback (most recent call last)" in text:  # torch.multiprocessing: a spawned rank's traceback
        return text.splitlines()[-1].strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if isinstance(exc, (UsageError, *_USER_ERRORS)) else f"{type(exc).__name__}: {line}"


def main(argv: list[str] | None = None) -> int:
    from epmoe import _logging

    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    prog = f"epmoe {args.command}"
    handler = _logging.configure(log_level(args))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns exceptions into exit codes
        if getattr(args, "debug", False):
            raise
        user = isinstance(exc, (UsageError, *_USER_ERRORS)) or _is_user_error_in_worker(exc)
        hint = "" if user else " (run with --debug for the traceback)"
        print(f"{prog}: error: {error_message(exc)}{hint}", file=sys.stderr)
        return EXIT_USAGE if user else EXIT_FAILURE
    finally:
        _logging.unconfigure(handler)


def _is_user_error_in_worker(exc: BaseException) -> bool:
    """A spawned rank (torch.multiprocessing) that died of a ValueError/TypeError/OSError/UsageError."""
    last = str(exc).strip().splitlines()[-1:] if "Traceback" in str(exc) else []
    names = ("ValueError", "TypeError", "UsageError", "FileNotFoundError", "PermissionError", "OSError")
    return bool(last) and last[0].split(":")[0].split(".")[-1] in names


if __name__ == "__main__":
    # Run the imported module's main, so that `python -m epmoe.cli` and the subcommands share one UsageError.
    from epmoe.cli import main as _main

    sys.exit(_main())
