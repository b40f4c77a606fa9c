"""Work done in a child process while this one does other work: an export or a build uses one core."""

from __future__ import annotations

import subprocess
import sys
import tempfile


class Child:
    """``python -c CODE ARGS...`` started now, its output kept in files (not pipes: nobody reads them while
    both processes work); ``wait()`` returns its stdout, or raises with its stderr if it failed; ``finish()``
    returns its exit status and output. As a context manager it kills the child if it is still running on
    the way out (the work done meanwhile in this process failed)."""

    def __init__(self, code: str, *args):
        self.what = " ".join(map(str, args))
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=self.stdout,
                                     stderr=self.stderr, text=True)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()

    def finish(self, timeout: float = 900) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once it has ended."""
        self.proc.wait(timeout=timeout)
        for f in (self.stdout, self.stderr):
            f.seek(0)
        return self.proc.returncode, self.stdout.read(), self.stderr.read()

    def wait(self, timeout: float = 900) -> str:
        code, out, err = self.finish(timeout)
        if code != 0:
            raise RuntimeError(f"child process ({self.what}) exited {code}:\n{err}")
        return out
