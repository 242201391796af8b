"""The one exception type for errors a user can cause (bad base, bad recipe, bad row, bad request).

Every message says what was wrong, where, and how to fix it; the CLI prints it on one line and exits 2.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """A user error: `what` went wrong, `where` (file, row, field or --flag), and `fix` (how to fix it)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.one_line())

    def __reduce__(self) -> tuple:  # keep what/where/fix across processes (serve/engine_process.py)
        return _restore, (type(self), self.what, self.where, self.fix)

    def one_line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " -- ".join(parts)


def _restore(cls: type, what: str, where: str | None, fix: str | None) -> ToolkitError:
    return cls(what, where=where, fix=fix)


def first_line(text: str, limit: int | None = None) -> str:
    """A message's first line, cut at `limit` characters; "" for an empty one (where `splitlines()[0]` raises)."""
    return text.splitlines()[0][:limit] if text else ""


def brief(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, e.g. to say why a fallback serves: its type and its message's first line."""
    return f"{type(exc).__name__}: {first_line(str(exc), limit)}"
