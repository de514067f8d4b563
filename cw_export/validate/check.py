"""One line of the validate table: a named check, whether it passed, and what it found."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
