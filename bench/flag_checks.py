"""Up-front checks of the benches' list flags (numbers use absl's lower_bound/upper_bound): a bad
value stops the bench at flag parsing, naming the flag, not minutes later deep inside a library."""
from __future__ import annotations

from typing import Callable, Iterable

from absl import app, flags


def _check(name: str, ok: Callable[[str], bool], what: str) -> None:
    def valid(values) -> bool:
        try:
            return bool(values) and all(ok(v) for v in values)
        except ValueError:
            return False
    flags.register_validator(name, valid, f"--{name} must be a comma-separated list of {what}")


def int_list(name: str, minimum: int = 1) -> None:
    _check(name, lambda v: int(v) >= minimum, f"integers >= {minimum}")


def float_list(name: str, low: float, high: float) -> None:
    """Floats in (low, high]."""
    _check(name, lambda v: low < float(v) <= high, f"numbers in ({low:g}, {high:g}]")


def name_list(name: str, names: Iterable[str]) -> None:
    names = list(names)
    _check(name, lambda v: v in names, "names out of " + ", ".join(names))


def no_arguments(argv: list[str]) -> None:
    """absl hands a bench's main the words that are not flags (`--configs tiny small`: `small`),
    which every main dropped: a list given with spaces ran on its first item alone."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}: a list flag takes commas, not "
                             "spaces (--name=a,b)")
