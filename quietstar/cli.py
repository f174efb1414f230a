"""key=value command lines (python -m quietstar.export / .generate / .eval), checked in one place.

`parse_kv(argv, defaults, rules)`: each argument is key=value with a key of `defaults`; the value is
converted to the type of the default (bool, int, float, str) and checked against its rule in `rules`;
every float must be finite. Anything else is a UserError naming the argument. `check_writable(path, what)`
makes sure an output path can be written before the work that produces it starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from quietstar.errors import UserError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class Rule(NamedTuple):
    ok: Callable[[object], bool]
    says: str  # what a good value is: "must be <says>"


POSITIVE = Rule(lambda x: x > 0, "> 0")
AT_LEAST_1 = Rule(lambda x: x >= 1, ">= 1")
NON_NEGATIVE = Rule(lambda x: x >= 0, ">= 0")
UNIT_OPEN_LEFT = Rule(lambda x: 0 < x <= 1, "in (0, 1]")


def one_of(*allowed) -> Rule:
    return Rule(lambda x: x in allowed, f"one of {', '.join(map(str, allowed))}")


def parse_kv(argv: Sequence[str], defaults: dict, rules: dict | None = None) -> dict:
    """key=value arguments (Hydra-style) onto typed defaults; unknown keys and bad values are a UserError."""
    args = dict(defaults)
    keys = " ".join(sorted(defaults))
    for a in argv:
        if "=" not in a:
            raise UserError(f"argument {a!r}: expected key=value (keys: {keys})")
        k, v = a.split("=", 1)
        if k not in args:
            raise UserError(f"unknown argument {k!r} (keys: {keys})")
        args[k] = _convert(k, v, defaults[k])
    for k, rule in (rules or {}).items():
        if args[k] is not None and not rule.ok(args[k]):
            raise UserError(f"argument {k}={args[k]!r}: must be {rule.says}")
    return args


def _convert(key: str, value: str, default):
    if isinstance(default, bool):
        if value.lower() not in TRUE + FALSE:
            raise UserError(f"argument {key}={value!r}: expected true or false")
        return value.lower() in TRUE
    if isinstance(default, (int, float)):
        kind = int if isinstance(default, int) else float
        try:
            x = kind(value)
        except ValueError:
            raise UserError(f"argument {key}={value!r}: expected {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(x):
            raise UserError(f"argument {key}={value!r}: must be a finite number")
        return x
    return None if value.lower() in ("null", "none") or (value == "" and default is None) else value


def check_writable(path, what: str) -> Path:
    """`path` can be created or overwritten as a file (its parent dirs are created). -> path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what}={path}: is a directory, expected a file path")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{what}={path}: cannot be written ({blocking} is a file, not a directory)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()
    except OSError as e:
        raise UserError(f"{what}={path}: cannot be written ({e.strerror or e})") from None
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"{what}={path}: its directory is not writable")
    return path
