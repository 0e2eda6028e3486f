"""How every command of the trainer reports a bad argument: one line ``<prog>: error: ...``, exit status 2.

``flowbp-train`` (``flowbp_train.cli``), ``flowbp-eval`` (``flowbp_train.evaluate``) and ``flowbp-mini``
(``flowbp_train.mini.cli``) parse with :class:`ArgumentParser`, raise :class:`UsageError` for what argparse
cannot check (ranges, files), and run their main through :func:`run_main`. The three commands import
this module, never each other, so the entry points in ``cli`` can import the commands lazily without a
circle.
"""

from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """A bad command-line argument, found before any work; the message is one line naming it."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``, exit status 2) instead of the usage
    block plus the error; ``--help`` still prints the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def run_main(prog: str, main, argv: list[str] | None) -> int:
    """Call ``main(argv)``; a :class:`UsageError` becomes one line on stderr and exit status 2, and an
    argparse exit becomes its status (so in-process callers get a return value, not SystemExit)."""
    try:
        return main(argv)
    except UsageError as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            return exc.code or 0
        raise
