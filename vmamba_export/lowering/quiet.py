"""Toolchains (torch.export, torch.onnx, coremltools, TVM) print progress, warnings and log lines on every
conversion; the CLI's output should stay ours. Errors still raise."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_toolchain(*logger_names: str) -> Iterator[None]:
    """Silence stdout, stderr (coremltools draws a tqdm bar per MIL pass), warnings and the named loggers (below
    ERROR) for the duration of the block. Exceptions still propagate with their messages."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch.onnx", "torch._dynamo", *logger_names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
