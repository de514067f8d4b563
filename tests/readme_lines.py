"""Print one of the README Quickstart's two shell lines ('main' or 'test'), so CI runs exactly what users read."""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart_lines() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)\n(.*?)```", section, re.S)
    if block is None:
        raise SystemExit("README Quickstart has no shell block")
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


if __name__ == "__main__":
    lines = quickstart_lines()
    print(lines[{"main": 0, "test": 1}[sys.argv[1]]])
