"""Served adapter names, and vLLM-compatible runtime loading: POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (off unless `toolkit serve --allow-runtime-adapters`).

Rules: a folder is loaded only from below the server's adapters folder (after resolving symlinks and `..`), by
the same checks as `--adapter` (name, files, safetensors only) and only if its manifest names the served base's
fingerprint. The engine's rows name peft adapters; a served name maps to one, and every running choice holds a
count on it. Unloading removes the name at once (new requests get 404) but deletes the weights only when the last
choice using them has finished, so in-flight requests finish on the weights they started with; a name loaded
again meanwhile gets fresh peft weights under a new internal name.

The model is mutated only while no forward pass runs: with runtime adapters on, the engine's model is wrapped in
`LockedModel`, whose every call holds a lock that loading and unloading take too.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from toolkit.serve.errors import APIError


class LockedModel:
    """The engine's model behind a lock: forward passes and adapter changes never overlap."""

    def __init__(self, model: Any) -> None:
        self.__dict__["inner"] = model
        self.__dict__["lock"] = threading.RLock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)


class AdapterSet:
    """Served adapter name -> engine (peft) adapter name, with counts of running choices."""

    def __init__(self, state: Any, *, allow_runtime: bool) -> None:
        self.state = state
        self.allow_runtime = allow_runtime
        self.engine_names = {name: name for name in state.adapters}  # startup adapters keep their names
        self.inflight: Counter[str] = Counter()
        self.retired: set[str] = set()
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def acquire(self, name: str, k: int) -> str:
        with self.lock:
            engine_name = self.engine_names.get(name)
            if engine_name is None:  # unloaded between the model check and now
                raise APIError(404, f"The model {name!r} does not exist", type="not_found_error", param="model")
            self.inflight[engine_name] += k
            return engine_name

    def release(self, engine_name: str) -> None:
        with self.lock:
            self.inflight[engine_name] -= 1
            gone = self.inflight[engine_name] <= 0 and engine_name in self.retired
            if gone:
                self.retired.discard(engine_name)
                del self.inflight[engine_name]
        if gone:
            self._delete(engine_name)

    # ---------------------------------------------------------------------------------------- runtime
    def _require(self) -> None:
        if not self.allow_runtime:
            raise APIError(
                404,
                "runtime adapter loading is off; start the server with --allow-runtime-adapters",
                type="not_found_error",
                code="runtime_adapters_disabled",
            )

    def resolve(self, name: str, path: str) -> Path:
        """The adapter folder for a load request, checked: inside the adapters folder, a valid adapter, trained
        on the served base."""
        from toolkit.errors import ToolkitError
        from toolkit.lora.registry import check_base_matches, resolve_adapter

        root = Path(self.state.adapters_dir or "adapters").resolve()
        given = Path(path)
        outside = APIError(400, f"lora_path must be a folder inside the adapters folder ({root})", param="lora_path")
        try:
            folder = (given if given.is_absolute() else root / given).resolve()
        except (OSError, ValueError):  # found by fuzzing: a NUL byte, or a name too long for the filesystem
            raise outside from None
        if not folder.is_relative_to(root):
            raise outside
        if name == self.state.served_name:
            raise APIError(400, f"lora_name {name!r} is the base's name", param="lora_name")
        try:
            _, folder = resolve_adapter(f"{name}={folder}")
            check_base_matches(folder, self.state.base)
        except OSError:  # a name too long for the filesystem
            raise outside from None
        except (ValueError, AttributeError):  # found in review: a toolkit.json that is not JSON, or not an object
            unreadable = f"{path!r} has no readable toolkit.json"
            raise APIError(400, unreadable, param="lora_path", code="invalid_adapter") from None
        except ToolkitError as err:
            param = "lora_name" if "name" in err.what and "not allowed" in err.what else "lora_path"
            raise APIError(400, err.what, param=param, code="invalid_adapter") from None
        return folder

    def loadable(self) -> list[str]:
        """The folders in the adapters folder a load request may name (adapters trained on the served base)."""
        if not self.allow_runtime:
            return []
        root = Path(self.state.adapters_dir or "adapters")
        found = []
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            try:
                self.resolve(folder.name, folder.name)
                found.append(folder.name)
            except APIError:
                continue
        return found

    def load(self, name: str, path: str) -> str:
        self._require()
        with self.lock:
            if name in self.engine_names:
                raise APIError(400, f"The lora adapter {name!r} has already been loaded", param="lora_name")
        folder = self.resolve(name, path)
        engine_name = re.sub(r"\W", "_", name) + f"__rt{next(self._ids)}"  # peft names cannot contain "."
        self._attach(engine_name, folder)
        with self.lock:
            if name in self.engine_names:  # a concurrent load of the same name won
                self.retired.add(engine_name)
                gone = True
            else:
                self.engine_names[name] = engine_name
                self.state.adapters[name] = folder
                gone = False
        if gone:
            self._delete(engine_name)
            raise APIError(400, f"The lora adapter {name!r} has already been loaded", param="lora_name")
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, name: str) -> str:
        self._require()
        with self.lock:
            engine_name = self.engine_names.pop(name, None)
            if engine_name is None:
                raise APIError(
                    404, f"The lora adapter {name!r} cannot be found", type="not_found_error", param="lora_name"
                )
            self.state.adapters.pop(name, None)
            busy = self.inflight[engine_name] > 0
            if busy:
                self.retired.add(engine_name)
        if not busy:
            self._delete(engine_name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _attach(self, engine_name: str, folder: Path) -> None:
        self.state.engine.run(attach_adapter, engine_name, str(folder))
        self._follow_model()

    def _delete(self, engine_name: str) -> None:
        self.state.engine.run(delete_adapter, engine_name)
        self._follow_model()

    def _follow_model(self) -> None:
        """An in-process engine's model is also the server's `state.base.model` (a peft wrapper may have come or
        gone); a server whose engine runs in its own process holds no model."""
        wrapped = getattr(self.state.engine, "model", None)
        if wrapped is not None:
            self.state.base = _with_model(self.state.base, wrapped.inner)


# Run where the model is (Engine.run): in the server's process or in the engine's own (engine_process.py).
def attach_adapter(wrapped: LockedModel, engine_name: str, folder: str) -> None:
    from peft import PeftModel

    from toolkit.lora.registry import enable_mixed_adapter_batches

    enable_mixed_adapter_batches()
    with wrapped.lock:  # no forward pass runs while peft injects or loads layers
        model = wrapped.inner
        if hasattr(model, "peft_config"):
            model.load_adapter(folder, adapter_name=engine_name, is_trainable=False)
        else:  # the first adapter of a server started without any: the base becomes a peft model
            model = PeftModel.from_pretrained(model, folder, adapter_name=engine_name, is_trainable=False)
            wrapped.__dict__["inner"] = model
        model.eval()


def delete_adapter(wrapped: LockedModel, engine_name: str) -> None:
    with wrapped.lock:
        model = wrapped.inner
        if set(model.peft_config) == {engine_name}:
            # peft cannot run a model without adapters (its active adapter would name the deleted one):
            # the last one goes by unwrapping the base again
            wrapped.__dict__["inner"] = model.unload()
        else:
            model.delete_adapter(engine_name)


def _with_model(base: Any, model: Any) -> Any:
    import dataclasses

    return dataclasses.replace(base, model=model)
