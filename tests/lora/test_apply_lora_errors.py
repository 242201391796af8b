"""apply_lora's user errors: peft's refusals become one ToolkitError line, whatever their message."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from toolkit.errors import ToolkitError, first_line
from toolkit.lora.config import apply_lora

SECTION = SimpleNamespace(
    r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], include_vision=False, rslora=False, dora=False
)


@pytest.mark.parametrize("message", ["no module matched\nthe rest of peft's text", ""])
def test_a_peft_refusal_is_one_line_even_without_a_message(monkeypatch, message):
    def refuse(model, config):
        raise ValueError(message)

    monkeypatch.setattr("peft.get_peft_model", refuse)
    with pytest.raises(ToolkitError) as err:  # an empty message raised IndexError before first_line
        apply_lora(object(), SECTION)
    assert err.value.what == f"peft cannot build this adapter: {message.split(chr(10))[0]}"
    assert err.value.where == "lora" and "target_modules" in err.value.fix


def test_first_line():
    assert first_line("one\ntwo", 2) == "on"
    assert first_line("one\ntwo") == "one"
    assert first_line("") == "" and first_line("\nsecond") == ""
