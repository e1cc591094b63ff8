"""Human sizes, as users type them on the command line: 4K, 256M, 1G, 1.5G (K = 1024)."""
from __future__ import annotations

import re

from infinity.errors import ConfigError, Problem

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, flag: str = "size") -> int:
    """Bytes in `text`: a whole number, or a number with a suffix K, M, G or T (powers of 1024;
    KiB, MB and the like are read the same way).  Signs are kept, so range checks can say
    "got -4096" rather than "cannot parse"; callers check the range."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError([Problem(flag, f"cannot read {text!r} as a size",
                                   "write bytes or a number with K, M, G or T, such as 4096, 256K, 1M or 1G")],
                          source="command line")
    number, unit = match.groups()
    value = float(number) * UNITS[unit.upper()] if "." in number else int(number) * UNITS[unit.upper()]
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError([Problem(flag, f"{text!r} is not a whole number of bytes ({value:g})",
                                   "give a size that is a whole number of bytes, such as 1536M")],
                          source="command line")
    return int(value)


def format_size(nbytes: int) -> str:
    """The shortest exact spelling of nbytes: 262144 → 256K, 1073741824 → 1G, 1000 → 1000."""
    for unit in ("T", "G", "M", "K"):
        scale = UNITS[unit]
        if nbytes and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)
