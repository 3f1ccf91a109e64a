"""Keep what native libraries (ITK, GDCM, MetaIO, onnxruntime) print on stderr off the terminal.

The command promises one line on stderr per error; C++ libraries write their own warnings
straight to file descriptor 2. Around a call that may do so, that descriptor is pointed
at a temporary file, and the text is handed back so it can be reported properly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import Iterator, List

_LOCK = threading.Lock()


@contextlib.contextmanager
def native_stderr_captured(sink: List[str]) -> Iterator[None]:
    """Route what is written on file descriptor 2 inside the block into ``sink``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with _LOCK, tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))
