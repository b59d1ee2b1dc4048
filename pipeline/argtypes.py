"""argparse types shared by the commands (`python -m pipeline`, `model.train`,
`model.evaluate`, `serving.client`, `serving.server`): a bad number is one line naming the option."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def number(kind: type, low: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse `type` for `kind` (int or float) values >= `low` (> `low` if strict)."""
    what = {int: "an integer", float: "a number"}[kind]
    bound = f"> {low}" if strict else f">= {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"
    return parse


def port(text: str) -> int:
    """An argparse `type` for a TCP port: 0 (any free port) to 65535."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text}")
    return value


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0.0, strict=True)
