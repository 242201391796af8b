"""The toolkit's own small C++ kernels, built at run time with inductor's C++ toolchain and Python binding.

Why this way: the kernels (engine/one_query.py, base/vocab_native.py) are a few dozen lines each, vectorised with
ATen's `at::vec` types from inductor's `cpp_prefix.h`, so they run the CPU's widest float unit as inductor's own
kernels do; the compiled decoding step needs that toolchain anyway, no build step ships with the package, and
`load_pybinding`'s binding is a plain C call per use (~1 us). It is inductor's private API, pinned with torch
(docs/DEPENDENCIES.md): where it moves or no compiler is found, `build` raises and each caller keeps its torch path.
"""

from __future__ import annotations

from typing import Any


def build(arg_types: list[str], source: str) -> Any:
    """The function `kernel` of the C++ `source` as a Python callable taking `arg_types` (pointers: tensors, whose
    data pointers it reads raw; int64_t and float: Python numbers). Built once per source; inductor keeps the build
    on disk. Raises what the toolchain raises where it cannot build."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    return CppPythonBindingsCodeCache.load_pybinding(arg_types, source, needs_vec_isa=True)
