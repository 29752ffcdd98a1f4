"""The ``jitkern`` command line: warm a cache ahead of time, inspect and maintain it, show the
setup. One module per command group (warmup, cache + bundle, info, presets); this module only
assembles the parser and turns user errors into one readable line and exit status 2."""

from __future__ import annotations

import argparse
import sys

from ..errors import JitkernError
from .common import CliError, HelpFormatter

DESCRIPTION = """\
jitkern compiles CUDA kernels specialized per model configuration with NVRTC and caches them.
The CLI warms that cache ahead of time (no GPU needed), ships it, and keeps it in shape.

examples:
  jitkern warmup --arch sm_90a                     # the built-in kernel set for H100/H200
  jitkern warmup --preset llama-3.1-70b --tp 8 --arch sm_90a
  jitkern cache ls
  jitkern info

`jitkern COMMAND --help` shows each command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    from . import cache, info, presets, warmup

    p = argparse.ArgumentParser(prog="jitkern", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    warmup.add_parser(sub)
    cache.add_parser(sub)
    info.add_parser(sub)
    presets.add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = "jitkern " + args.command + (f" {args.cache_command}" if args.command == "cache" else "")
    try:
        return args.fn(args)
    except CliError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return e.code
    except JitkernError as e:  # NVRTC or the CUDA headers missing: the message says what to install
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `jitkern cache ls | head`
        return 0
