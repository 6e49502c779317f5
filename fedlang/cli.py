"""The `fedlang` command line.

    fedlang check FILE... [--format text|json]   exit 0 clean, 1 on errors
    fedlang types FILE                           each declaration with its type
    fedlang --version

Users never see a Python traceback: their mistakes are diagnostics, and a bug
in fedlang is reported as an internal error that says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    from fedlang import __version__

    parser = argparse.ArgumentParser(
        prog="fedlang", description="A typed language and compiler for federated computations.")
    parser.add_argument("--version", action="version", version=f"fedlang {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check", help="check that programs are well typed and correctly placed")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--format", choices=("text", "json"), default="text",
                       help="json: machine-readable diagnostics on stdout")
    types = commands.add_parser("types", help="print each declaration with its type")
    types.add_argument("file", metavar="FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "check":
            return _check(args.files, args.format)
        if args.command == "types":
            return _types(args.file)
    except KeyboardInterrupt:
        print("fedlang: interrupted", file=sys.stderr)
        return 130
    except Exception as error:       # noqa: BLE001 - the last line of defence against tracebacks
        print(f"internal compiler error: {type(error).__name__}: {error}\n"
              "This is a bug in fedlang, not in your program. Please report it with the file that caused it.",
              file=sys.stderr)
        if os.environ.get("FEDLANG_DEBUG"):
            traceback.print_exc()
        return EXIT_INTERNAL
    raise AssertionError(args.command)


def _check(files: list[str], fmt: str) -> int:
    from fedlang.api import check
    from fedlang.diagnostics import to_json

    result = check(*files)
    errors = len(result.errors)
    warnings = len(result.diagnostics) - errors
    if fmt == "json":
        json.dump({"files": files, "ok": result.ok, "errors": errors, "warnings": warnings,
                   "diagnostics": [to_json(d) for d in result.diagnostics]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK if result.ok else EXIT_ERRORS
    if result.diagnostics:
        print(result.render() + "\n", file=sys.stderr)
    noun = "file" if len(files) == 1 else "files"
    if errors:
        print(f"fedlang: {_plural(errors, 'error')} in {len(files)} {noun}", file=sys.stderr)
        return EXIT_ERRORS
    print(f"fedlang: {len(files)} {noun} checked, no errors"
          + (f" ({_plural(warnings, 'warning')})" if warnings else ""))
    return EXIT_OK


def _types(file: str) -> int:
    from fedlang.api import check

    result = check(file)
    if result.diagnostics:
        print(result.render() + "\n", file=sys.stderr)
    if not result.ok:
        print(f"fedlang: {_plural(len(result.errors), 'error')} in 1 file", file=sys.stderr)
        return EXIT_ERRORS
    for kind, name, t in result.module().declarations:
        if kind == "type":
            print(f"type {name} = {t}")
        else:
            print(f"{kind} {name} : {t}")
    return EXIT_OK


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


if __name__ == "__main__":
    sys.exit(main())
