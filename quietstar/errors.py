"""One exception type for mistakes a person can fix, and one wrapper that turns it into one line.

`UserError` (a ValueError) is raised for a bad config value, a bad file or a bad argument; its message
names the field, file (and line) or argument. Its kinds: `ConfigError` (a config field), `LoadError` (a
pretrained model, config or tokenizer that cannot be loaded) and `MissingFileError` (a file that is not
there). Every entry point (train.py, python -m quietstar.export / .generate / .eval) runs its main function
through `run_main`, which prints such an error as one line on stderr and exits with status 2. Anything
else is a bug and keeps its full traceback. Set QUIETSTAR_TRACEBACK=1 to see the traceback of user errors too.

Running out of memory is reported the same way (it is fixed by changing the config, not the code), with
the fields that lower the memory a step needs.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

TRACEBACK_ENV = "QUIETSTAR_TRACEBACK"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A bad config value, file or argument; the message names it and says what is wrong."""


class ConfigError(UserError):
    """A config field with a bad value; the message starts with the field's dotted name."""


class LoadError(UserError):
    """A model, config or tokenizer that cannot be loaded; the message names the file and the problem."""


class MissingFileError(LoadError, FileNotFoundError):
    """A file or directory that should be there is not."""


OOM_HINT = ("lower data.batch_size, data.seq_len, thought.n_thoughts or thought.n_ahead, or set "
            "model.grad_checkpointing=true")


def out_of_memory_message(exc: BaseException) -> str | None:
    """The message for an allocation failure (CUDA, CPU or Python), or None for any other error."""
    import torch

    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and (
            "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text)):
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return f"out of memory ({first[:200]}): {OOM_HINT}"
    if isinstance(exc, MemoryError):
        return f"out of memory (MemoryError): {OOM_HINT}"
    return None


def tracebacks_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_main(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs); a UserError or an out-of-memory error -> `error: <message>` and exit 2."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        message = str(e) if isinstance(e, UserError) else out_of_memory_message(e)
        if message is None or tracebacks_wanted():
            raise
        if not getattr(e, "quiet", False):  # quiet: another process of the run printed this error already
            print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
