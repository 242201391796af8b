"""The one exception type for errors a user can cause (bad base, bad recipe, bad row, bad request).

Every message says what was wrong, where, and how to fix it; the CLI prints it on one line and exits 2.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """A user error: `what` went wrong, `where` (file, row, field or --flag), and `fix` (how to fix it)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " -- ".join(parts)
