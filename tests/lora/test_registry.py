"""Adapter names resolve only inside the adapters folder; adapters for another base are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from toolkit.errors import ToolkitError
from toolkit.lora.registry import check_base_matches, resolve_adapter


@pytest.fixture()
def adapters_dir(tmp_path):
    d = tmp_path / "adapters" / "mine"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"")
    (d / "toolkit.json").write_text(json.dumps({"base": {"fingerprint": "abc", "path": "somewhere"}}))
    return tmp_path / "adapters"


def test_names_paths_and_name_equals_path(adapters_dir):
    assert resolve_adapter("mine", adapters_dir) == ("mine", adapters_dir / "mine")
    assert resolve_adapter(f"other={adapters_dir / 'mine'}", adapters_dir)[0] == "other"
    assert resolve_adapter(str(adapters_dir / "mine"), adapters_dir)[0] == "mine"


@pytest.mark.parametrize("name", ["../mine", "..", ".hidden", "a/b", "a\\b", "", "x" * 200, "..=/tmp"])
def test_traversal_and_odd_names_are_refused(adapters_dir, name):
    with pytest.raises(ToolkitError, match="is not allowed|no adapter"):
        resolve_adapter(name, adapters_dir)


def test_missing_folder_and_pickle_only_adapters_are_refused(adapters_dir):
    with pytest.raises(ToolkitError, match="no adapter at"):
        resolve_adapter("absent", adapters_dir)
    pickled = adapters_dir / "pickled"
    shutil.copytree(adapters_dir / "mine", pickled)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ToolkitError, match="only safetensors weights are loaded"):
        resolve_adapter("pickled", adapters_dir)


def test_adapter_for_another_base_is_refused(adapters_dir, base):
    with pytest.raises(ToolkitError, match="was trained on base abc"):
        check_base_matches(adapters_dir / "mine", base)
