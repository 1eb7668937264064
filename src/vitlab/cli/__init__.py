"""The `vitlab` command line: a small dispatcher. Each command's parser and its few lines of glue live in
one module here (train, study, inspect, models, serve); the work is done by the library."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from vitlab.cli import inspect, models, serve, study, train
from vitlab.cli.parser import OneLineErrorParser
from vitlab.errors import VitlabError

COMMANDS = {
    "train": train.run, "compare": study.run_compare, "sweep": study.run_sweep, "report": study.run_report,
    "evaluate": inspect.run_evaluate, "attention": inspect.run_attention, "explain": inspect.run_explain,
    "predict": inspect.run_predict, "export": inspect.run_export, "gif": inspect.run_gif, "models": models.run,
    "serve": serve.run,
}


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="vitlab", description="Train, compare and look inside ViTs and CNNs on CIFAR-10.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for module in (train, study, inspect, models, serve):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["vitlab", *argv])
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status = COMMANDS[args.command](args)
    except VitlabError as error:
        print(f"vitlab {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk, a vanished folder, ... (files are written atomically: nothing half-written)
        print(f"vitlab {args.command}: error: {os_error_message(error, args.command)}", file=sys.stderr)
        return 1
    return status or 0


def os_error_message(error: OSError, command: str) -> str:
    import errno

    where = f" ({error.filename})" if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space" + (", then continue with: vitlab train --resume RUN_DIR" if command == "train" else "")
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose a folder you can write to, or fix its permissions"
    else:
        hint = "; check the path and try again"
    return f"{reason}{where}{hint}"
