"""Capture what native code writes to the process's stdout and stderr."""

import contextlib
import ctypes
import io
import os
import sys
import tempfile


@contextlib.contextmanager
def captured_output():
    """Redirects file descriptors 1 and 2, and `sys.stdout`/`sys.stderr`, to a buffer.

    Yields:
        A list that, after the block, holds the captured text as its only item.
    """
    captured = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    python_output = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(python_output), contextlib.redirect_stderr(python_output):
                yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace") + python_output.getvalue())
