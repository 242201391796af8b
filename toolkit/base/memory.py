"""How many bytes a model's tensors hold, counted the same way for every loading path."""

from __future__ import annotations

from pathlib import Path


def model_tensor_bytes(model) -> int:
    """Bytes of all distinct tensor storages a model holds: parameters, buffers and tensor attributes.

    Tensor attributes count too, because a kernel can cache a dequantised copy outside its buffers.
    """
    import torch

    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())

    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            add(t)
        for value in vars(module).values():
            add(value)
    return sum(seen.values())


def dense_bf16_bytes(base_dir: str | Path) -> int:
    """Bytes the base would take with every parameter dense in bfloat16 (2 bytes a parameter)."""
    from toolkit.base.info import describe

    return 2 * describe(base_dir)["parameters"]
