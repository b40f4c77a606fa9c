"""fluxrt's command line called in this process, its output kept (code used only by tests)."""

from __future__ import annotations

import contextlib
import io

from fluxrt.cli import main


def cli(argv) -> tuple[int, str]:
    """``fluxrt ARGV...`` -> (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()
