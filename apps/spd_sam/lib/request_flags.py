"""The one reading of a true/false request parameter, for infer and train requests alike."""

from __future__ import annotations

from typing import Any

from monailabel.utils.others.generic import strtobool


def parse_flag(value: Any, name: str, error: type[Exception] = ValueError) -> bool:
    """``value`` as a bool: a JSON bool, or anything MONAI Label's ``strtobool`` reads (true/false, yes/no, 1/0,
    on/off). Anything else raises ``error`` with a message that names the parameter."""
    if isinstance(value, bool):
        return value
    try:
        return strtobool(str(value).strip())
    except ValueError:
        raise error(f"{name} must be true or false, got {value!r}") from None
