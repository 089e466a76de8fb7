"""Reading a Prometheus text exposition in tests."""
from __future__ import annotations

import re


def sample(text: str, name: str) -> float:
    """The value of the unlabelled sample `name`, or 0 where it is absent (a counter nothing has written yet)."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0
