"""User-facing errors: one message that names the file or option and what to do, and a non-zero exit."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2


class SeglightError(Exception):
    """A problem with the user's data, config or files (not a bug): reported without a traceback."""


class DataError(SeglightError):
    """A dataset, datalist or image file that cannot be used."""


class ConfigError(SeglightError):
    """An option or combination of options that cannot work."""


class DiskFullError(SeglightError):
    """A write that found no space left on its disk (or the user's quota spent): the folder and the space it needs."""


_ERROR_TYPES: dict[str, type[SeglightError]] = {
    "SeglightError": SeglightError,
    "DataError": DataError,
    "ConfigError": ConfigError,
    "DiskFullError": DiskFullError,
}
_WORKER_ERROR_LINE = re.compile(r"^seglight\.core\.errors\.(\w+): (.+)$", re.MULTILINE)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries' explanations run on), else its type's name."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def describe_exception(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for the detail in parentheses of a message."""
    text = first_line(exc)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def find_user_error(exc: BaseException) -> SeglightError | None:
    """The SeglightError behind ``exc``, if any; MONAI, Hydra and DataLoader workers wrap the ones we raise."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        # A DataLoader worker sends only the type and text of its exception, and MONAI's Compose has wrapped ours
        # in a RuntimeError by then: ours survives as a line of the worker's traceback text.
        text = str(current)
        from_worker = _WORKER_ERROR_LINE.findall(text) if "Original Traceback" in text else []
        if from_worker:
            kind, message = from_worker[-1]
            return _ERROR_TYPES.get(kind, SeglightError)(message)
        if isinstance(current, SeglightError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def reported_errors(prog: str = "seglight") -> Iterator[None]:
    """Turn a SeglightError raised inside the block into one line on stderr and exit status 2."""
    try:
        yield
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        print(f"{prog}: error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
