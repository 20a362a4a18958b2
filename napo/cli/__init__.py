"""The `napo` command: one entry point, one subcommand per user job, one error boundary.

This package is a thin layer over functions that can be imported; nothing in napo imports it. A subcommand is a
`Command` record (`napo.cli.parser`) in its own module — `pairs`, `train`, `eval`, `compare`, `lab` — holding the
dataclasses its options come from (the library's own config classes — `PairsConfig`, `NaPOConfig`, `TrainArguments`,
`CompareConfig` — plus small CLI-only ones) and a `run` function that calls into the library and returns what to
print. How options are parsed (`--config run.yaml`, repeatable `--flag KEY=VALUE`) is in `napo.cli.parser`.

Adding a subcommand is one module defining its `Command` and one entry in `COMMANDS`; adding options to a command is
adding a dataclass to its parser's `arguments` and reading `invocation[ThatClass]` in its `run`.

Errors end as one paragraph on stderr and an exit code (`EXIT_CODES`); `--debug`, anywhere on the command line,
prints the traceback first. On success the summary lines are printed, then one `name: path` line per written file.
"""

from __future__ import annotations

import difflib
import errno
import logging
import sys
import traceback

from napo.cli.compare import COMPARE
from napo.cli.eval import EVAL, EvalArguments
from napo.cli.lab import LAB, LabArguments
from napo.cli.pairs import PAIRS, PairsJob
from napo.cli.parser import Command, Invocation, UsageError
from napo.cli.train import TRAIN

__all__ = [
    "COMMANDS",
    "EXIT_CODES",
    "CommandFailed",
    "EvalArguments",
    "LabArguments",
    "PairsJob",
    "UsageError",
    "describe_failure",
    "main",
    "parse_command",
    "top_level_help",
]

EXIT_CODES = {
    0: "done",
    1: "unexpected error (a bug, or a case napo does not handle: rerun with --debug and report it)",
    2: "bad command line or --config file",
    3: "bad data or settings (the message names the row, file or option)",
    4: "file system error: a folder that cannot be made or written, a full disk, a missing file",
    5: "the output folder is in use by another napo job",
    6: "out of memory",
    130: "interrupted (Ctrl-C)",
}
DEBUG_FLAG = "--debug"


class CommandFailed(SystemExit):
    """How `main` ends a failed command: `code` is the exit status (`EXIT_CODES`), str() the printed message."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


COMMANDS = {command.name: command for command in (PAIRS, TRAIN, EVAL, COMPARE, LAB)}


def top_level_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: napo COMMAND [options] [--config run.yaml] [--debug]",
        "",
        "Noise-aware preference optimization against modality bias in multimodal models.",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {command.help}" for name, command in COMMANDS.items()),
        "",
        "`napo COMMAND --help` lists a command's options. --config YAML sets any of them by field name (options on",
        "the command line override it). --debug prints the traceback of an error.",
        "",
        "exit codes:",
        *(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items()),
    ]
    return "\n".join(lines) + "\n"


def parse_command(argv: list[str]) -> Invocation:
    """The `Invocation` of `napo ARGV` (argv[0] is the command); argparse exits 2 on a bad option, 0 after --help."""
    command = COMMANDS[argv[0]]
    renamed = dict(command.earlier_spellings)
    rest = [renamed.get(item, item) for item in argv[1:]]
    return Invocation(command.name, list(argv[1:]), command.build_parser().parse(rest))


# ------------------------------------------------------------------------------------------------ error boundary
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (main() may run many times in one process, as in
    tests, each with its own stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def main(argv: list[str] | None = None) -> None:
    """Run `napo ARGV`; on failure print one paragraph and raise `CommandFailed` (a SystemExit) with its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    napo_logger = logging.getLogger("napo")  # napo's own INFO lines (e.g. the layout read and its row count)
    if not napo_logger.handlers:
        napo_logger.addHandler(_StderrHandler())
        napo_logger.setLevel(logging.INFO)
    debug = DEBUG_FLAG in argv
    argv = [item for item in argv if item != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help(), end="", file=sys.stdout if argv else sys.stderr)
        if not argv:
            raise CommandFailed(2, "napo: no command given")
        return
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, 1)
        message = (
            f"napo: unknown command {argv[0]!r}"
            + (f" (did you mean {close[0]}?)" if close else "")
            + f"; commands: {', '.join(COMMANDS)}"
        )
        print(message, file=sys.stderr)
        raise CommandFailed(2, message)
    command = COMMANDS[argv[0]]
    try:
        summary, outputs = command.run(parse_command(argv))
    except SystemExit:  # argparse's own exits (usage errors: 2, --help: 0) and nested napo ones
        raise
    except BaseException as error:  # noqa: BLE001 - the boundary: every failure ends as a message and a code
        code, message = describe_failure(command, error)
        if debug:
            traceback.print_exc()
        print(message, file=sys.stderr)
        raise CommandFailed(code, message) from None
    for line in summary:
        print(line)
    for name, path in outputs.items():
        print(f"{name}: {path}")


def describe_failure(command: Command, error: BaseException) -> tuple[int, str]:
    """(exit code, one-paragraph message) for an exception that ended `command` (see EXIT_CODES)."""
    import torch

    from napo.jobs import OutputFolderBusy

    prefix = f"napo {command.name}:"
    text = " ".join(str(error).split())
    if isinstance(error, KeyboardInterrupt):
        return 130, f"{prefix} interrupted (Ctrl-C). {command.resume_hint}"
    if isinstance(error, UsageError):
        return 2, f"{prefix} {text}"
    if isinstance(error, OutputFolderBusy):
        return 5, f"{prefix} {text}"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return 6, (
            f"{prefix} out of memory ({text or type(error).__name__}): lower the batch size (or max_length), "
            f"or use a machine with more memory. {command.resume_hint}"
        )
    if isinstance(error, OSError):
        return 4, f"{prefix} {_describe_os_error(error)} {command.resume_hint}"
    if isinstance(error, (ValueError, FloatingPointError, ImportError)):
        return 3, f"{prefix} {text}"
    return 1, (
        f"{prefix} unexpected error {type(error).__name__}: {text}. This is a bug in napo or a case it does not "
        "handle yet: rerun with --debug for the traceback and report it."
    )


def _describe_os_error(error: OSError) -> str:
    """What went wrong on disk and what to do, in one sentence or two."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"the disk is full{where}: free some space or choose a folder on another disk, then rerun."
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {error.strerror}. Choose a folder you can write to."
    if error.errno in (errno.ENOTDIR, errno.EEXIST) and error.filename:
        return f"cannot make the folder{where}: a file of that name is in the way ({error.strerror})."
    if error.strerror and error.filename:
        return f"{error.strerror}{where}."
    return " ".join(str(error).split()) + "."
