"""Builds llama.cpp's Python server (the peer in bench/peer_serve.py) the way its users do, and says what it built.

    python3 bench/llama_build.py --venv build/llama-venv --gguf FILE [--build auto|native|workaround]

1. A fresh venv and a plain `pip install "llama-cpp-python[server]==0.3.36"`: llama.cpp compiled with its
   defaults (GGML_NATIVE=ON, i.e. -march=native), what a user who installs it gets.
2. A smoke test in a subprocess: load the GGUF, evaluate a prompt of some hundred tokens (batched matmuls) and
   generate a few tokens (one-row matmuls).
3. Only if that subprocess dies by a signal (SIGILL, SIGSEGV, ...) rebuild with the workaround: GGML_NATIVE=OFF,
   AMX off, the SIMD features /proc/cpuinfo lists. Known case: a VM lists AMX in /proc/cpuinfo without granting
   its register state, and the native build faults on its first `ldtilecfg` (an Intel Xeon VM here, 2026-12-01).
   Then smoke-test again.
4. VENV/BUILD.json: which build, its CMake arguments, why, and llama.cpp's own system info line; the Makefile's
   stamp for `make llama-cpp`, and bench/peer_serve.py copies it into its report.

Standard library only (and toolkit.base.kernel_probe, which is too at import): runs with the Python that creates
the venv, before any project venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toolkit.base.kept_choices import cpu_name  # noqa: E402 (standard library only at import)

SPEC = "llama-cpp-python[server]==0.3.36"
SMOKE_TIMEOUT_S = 300

# Runs inside the llama venv. The prompt is long enough for batched prompt evaluation (the matmul path AMX tiles
# take) and the generation covers the one-row path; the system info line says which CPU features were compiled in.
SMOKE = r"""
import json, sys, time
import llama_cpp
t = time.perf_counter()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=1024, verbose=False)
prompt = "The history of the city is long. " * 40 + "In one sentence, the city is"
out = llm(prompt, max_tokens=8, temperature=0)
print(json.dumps({
    "version": llama_cpp.__version__,
    "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    "prompt_tokens": out["usage"]["prompt_tokens"],
    "completion_tokens": out["usage"]["completion_tokens"],
    "text": out["choices"][0]["text"],
    "seconds": round(time.perf_counter() - t, 2),
}))
"""


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def workaround_cmake_args(flags: set[str]) -> list[str]:
    """Not -march=native: the SIMD features the CPU lists, AMX off (listed is not granted on some VMs)."""
    on = {  # ggml's option -> the /proc/cpuinfo flag it needs
        "GGML_AVX": "avx",
        "GGML_AVX2": "avx2",
        "GGML_FMA": "fma",
        "GGML_F16C": "f16c",
        "GGML_BMI2": "bmi2",
        "GGML_AVX512": "avx512f",
        "GGML_AVX512_VBMI": "avx512vbmi",
        "GGML_AVX512_VNNI": "avx512_vnni",
        "GGML_AVX512_BF16": "avx512_bf16",
    }
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return args + [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in on.items()]


def pip_install(venv: Path, cmake_args: list[str], reinstall: bool) -> None:
    # CMAKE_ARGS / FORCE_CMAKE from the caller's shell would silently change the "default" build: set ours only
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "FORCE_CMAKE")}
    if cmake_args:
        env["CMAKE_ARGS"] = " ".join(cmake_args)
    cmd = [str(venv / "bin" / "pip"), "install", "--quiet", "--no-cache-dir"]
    # the rebuild replaces only the compiled package; the server's dependencies are already there
    cmd += ["--force-reinstall", "--no-deps", SPEC.replace("[server]", "")] if reinstall else [SPEC]
    print(f"llama_build: {' '.join(cmd)}" + (f"  (CMAKE_ARGS={env['CMAKE_ARGS']})" if cmake_args else ""), flush=True)
    t = time.time()
    subprocess.run(cmd, env=env, check=True)
    print(f"llama_build: built in {time.time() - t:.0f} s", flush=True)


def smoke(venv: Path, gguf: str) -> dict:
    """Runs SMOKE in a subprocess: {"ok": True, ...its JSON} or {"ok": False, "signal"/"returncode", "stderr"}."""
    try:
        r = subprocess.run(
            [str(venv / "bin" / "python"), "-c", SMOKE, gguf], capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "returncode": None, "stderr": f"no answer in {SMOKE_TIMEOUT_S} s"}
    if r.returncode == 0:
        return {"ok": True, **json.loads(r.stdout.strip().splitlines()[-1])}
    failure: dict = {"ok": False, "returncode": r.returncode, "stderr": r.stderr[-2000:]}
    if r.returncode < 0:  # killed by a signal: the CPU or the build, not the test
        failure["signal"] = signal.Signals(-r.returncode).name
    return failure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", default="build/llama-venv")
    ap.add_argument("--gguf", required=True, help="the GGUF the smoke test loads (the real 270M's)")
    ap.add_argument(
        "--build",
        choices=["auto", "native", "workaround"],
        default="auto",
        help="auto: native, the workaround only if the native build's smoke test dies by a signal",
    )
    args = ap.parse_args()
    venv = Path(args.venv)
    record = venv / "BUILD.json"
    record.unlink(missing_ok=True)  # a venv without BUILD.json is unfinished: make runs this again

    # a fresh venv: an earlier llama_cpp built with other flags must not pass for this build
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--upgrade", "pip"], check=True)

    build, cmake_args, native_failure = "native", [], None
    reason = "the default build (no CMake arguments: GGML_NATIVE=ON, -march=native) passed its smoke test"
    if args.build == "workaround":
        build, cmake_args, reason = "workaround", workaround_cmake_args(cpu_flags()), "asked for (--build workaround)"
    pip_install(venv, cmake_args, reinstall=False)
    result = smoke(venv, args.gguf)
    if not result["ok"] and build == "native" and args.build == "auto" and "signal" in result:
        native_failure = result
        print(f"llama_build: the native build's smoke test died ({result['signal']}); rebuilding", flush=True)
        print(result["stderr"][-600:], file=sys.stderr)
        build, cmake_args = "workaround", workaround_cmake_args(cpu_flags())
        reason = f"the native build's smoke test died by {result['signal']}; this one passed it"
        pip_install(venv, cmake_args, reinstall=True)
        result = smoke(venv, args.gguf)
    if not result["ok"]:
        print(result["stderr"], file=sys.stderr)
        sys.exit(f"llama_build: the {build} build's smoke test failed ({result.get('signal') or result['returncode']})")

    info = {
        "build": build,
        "package": SPEC,
        "cmake_args": cmake_args,
        "reason": reason,
        "system_info": result["system_info"],
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "smoke": {k: result[k] for k in ("prompt_tokens", "completion_tokens", "text", "seconds")},
    }
    if native_failure:
        info["native_failure"] = {k: native_failure.get(k) for k in ("signal", "returncode")}
        info["native_failure"]["stderr_tail"] = native_failure["stderr"][-600:]
    record.write_text(json.dumps(info, indent=2) + "\n")
    print(f"llama_build: {build} build of llama.cpp passes its smoke test ({record})")
    print(f"llama_build: {info['system_info']}")


if __name__ == "__main__":
    main()
