"""Preference rows: a prompt with a preferred (chosen) answer, a dispreferred (rejected) one, or both.

(Being written: the door for preference and KTO rows lands here.)
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.data.datasets import EncodedRow


@dataclass
class Preference:
    """One item of preference data, encoded: a pair (both sides) or, for KTO, one labelled side (the other None).

    Each side is a whole conversation (the shared prompt, then that answer) encoded by the template, its labels
    set on the answer only; both sides of a pair carry the same prompt tokens.
    """

    where: str  # file:row
    chosen: EncodedRow | None
    rejected: EncodedRow | None

    @property
    def paired(self) -> bool:
        return self.chosen is not None and self.rejected is not None
