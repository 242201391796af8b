"""`toolkit train` end to end on the tiny base: learning, files, frozen base, peft reload, resume, atomicity."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, accelerate_train, same_weights, start_cli_logged

from toolkit.errors import ToolkitError
from toolkit.recipe import load_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def recipe(tiny_ct, out_dir, *extra):
    return load_recipe(QUICKSTART, [f"base.path={tiny_ct}", f"output.dir={out_dir}", *extra])


def test_quickstart_adapter_clearly_beats_the_base_on_text_and_image(trained):
    base, adapter = trained.metrics["base"], trained.metrics["adapter"]
    assert adapter["loss"] < 0.25 * base["loss"], (base["loss"], adapter["loss"])
    assert base["exact_match.text"] <= 0.1 and base["exact_match.image"] <= 0.1
    assert adapter["exact_match.text"] >= 0.25, adapter
    assert adapter["exact_match.image"] >= 0.5, adapter
    assert trained.step == 210  # 84 rows / batch 4 x 10 epochs


def test_adapter_folder_holds_peft_files_manifest_curve_and_card(trained):
    d = trained.adapter_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "toolkit.json",
        "loss.png",
        "README.md",
        "metrics.jsonl",
    ):
        assert (d / name).is_file(), name
    assert (d / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((d / "tensorboard").iterdir())
    manifest = json.loads((d / "toolkit.json").read_text())
    assert len(manifest["base"]["fingerprint"]) == 16 and manifest["base"]["quantization"]["bits"] == 4
    assert manifest["recipe"]["lora"]["r"] == 16 and len(manifest["dataset"]["sha256"]) == 16
    assert manifest["dataset"]["train_rows"] == 84 and manifest["metrics"]["train"]["steps"] == 210
    assert {"torch", "transformers", "peft", "trl", "gptqmodel"} <= set(manifest["versions"])
    logs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "loss", "learning_rate", "tokens_per_s"} <= set(r) for r in logs if "loss" in r)
    assert logs[-1]["tokens_seen"] > 0
    card = (d / "README.md").read_text()
    assert "| loss |" in card and "| exact_match.image |" in card
    assert not list(d.parent.glob(".quickstart*"))  # run folder and staging are gone


def test_only_lora_weights_train_and_the_base_is_unchanged(trained, tiny_ct):
    from toolkit.base.loader import load_base

    model = trained.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    fresh = load_base(tiny_ct, device="cpu").model.state_dict()
    after = {
        k.replace(".base_layer.", "."): v
        for k, v in model.get_base_model().state_dict().items()
        if "lora_" not in k and ".quant_linear_module." not in k
    }  # peft's alias of base_layer
    assert set(after) == set(fresh)
    for name, tensor in fresh.items():
        assert torch.equal(after[name], tensor), name
    with open(trained.adapter_dir / "adapter_model.safetensors", "rb"):
        from safetensors import safe_open

        with safe_open(trained.adapter_dir / "adapter_model.safetensors", "pt") as f:
            keys = list(f.keys())
    assert keys and all(".language_model.layers." in k and ("lora_A" in k or "lora_B" in k) for k in keys)


def test_plain_peft_reload_reproduces_the_trained_logits(trained, tiny_ct):
    from peft import PeftModel

    from toolkit.base.loader import load_base

    # the kernel training ran on (timed fastest here, kernel_probe.py), in its training mode: an exact comparison
    kernel = trained.metrics["train"]["kernel"].split()[0]
    base = load_base(tiny_ct, device="cpu", kernel=kernel, training=True)
    reloaded = PeftModel.from_pretrained(base.model, str(trained.adapter_dir))
    reloaded.eval()
    ids = torch.tensor([[2, 105, 400, 500, 600, 106, 105]])
    with torch.no_grad():
        a = trained.model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        b = reloaded(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad(), trained.model.disable_adapter():
        plain = trained.model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapter changes the model


def test_refuses_to_overwrite_and_writes_atomically(trained, tiny_ct, monkeypatch):
    from toolkit.lora import folder as adapter_files
    from toolkit.train.trainer import train

    out = trained.adapter_dir.parent
    with pytest.raises(ToolkitError, match="already exists"):
        train(recipe(tiny_ct, out))
    before = {p.name: p.read_bytes() for p in trained.adapter_dir.iterdir() if p.is_file()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapter_files, "_plot", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        train(recipe(tiny_ct, out, "training.max_steps=2"), overwrite=True)
    after = {p.name: p.read_bytes() for p in trained.adapter_dir.iterdir() if p.is_file()}
    assert after == before  # the old adapter is whole
    assert not list(out.glob(".quickstart.tmp-*"))


def test_dora_and_packing_give_clear_errors(tiny_ct, tmp_path):
    from toolkit.train.trainer import train

    with pytest.raises(ToolkitError, match="lora.dora: DoRA is not available on 4-bit GPTQ layers"):
        train(recipe(tiny_ct, tmp_path, "lora.dora=true", "training.max_steps=1"))
    with pytest.raises(ToolkitError, match="training.packing: packing is not supported for Gemma 3"):
        train(recipe(tiny_ct, tmp_path, "training.packing=true"))


def _finish(proc, log: Path, timeout: int = 300) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, log.with_suffix(".err").read_text()


def _resume_args(tiny_ct) -> list[str]:
    return [
        "--set",
        f"base.path={tiny_ct}",
        "--set",
        "training.max_steps=80",
        "--set",
        "training.save_every=20",
        "--set",
        "training.logging_every=1",
    ]


@pytest.fixture(scope="module")
def straight_run(tiny_ct, tmp_path_factory) -> Path:
    """The 80-step run, uninterrupted: what an interrupted-and-resumed run must reproduce."""
    d = tmp_path_factory.mktemp("straight")
    proc = start_cli_logged(d / "log", "train", QUICKSTART, *_resume_args(tiny_ct), "--set", f"output.dir={d}")
    code, err = _finish(proc, d / "log")
    assert code == 0, err[-2000:]
    return d / "quickstart"


def _wait_for(path: Path, proc, seconds: int = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not path.exists():
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tiny_ct, tmp_path, straight_run):
    common = _resume_args(tiny_ct)
    interrupted = start_cli_logged(
        tmp_path / "interrupted", "train", QUICKSTART, *common, "--set", f"output.dir={tmp_path / 'b'}"
    )
    _wait_for(tmp_path / "b" / ".quickstart.run" / "checkpoint-20", interrupted)
    os.kill(interrupted.pid, signal.SIGINT)  # past step 20: press Ctrl-C
    code, err = _finish(interrupted, tmp_path / "interrupted")
    assert code == 130, err[-2000:]
    assert "interrupted at step" in err and "--resume" in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert 20 <= step < 80 and (tmp_path / "b" / ".quickstart.run" / f"checkpoint-{step}").is_dir()
    assert not (tmp_path / "b" / "quickstart").exists()
    resumed = start_cli_logged(
        tmp_path / "resumed", "train", QUICKSTART, *common, "--set", f"output.dir={tmp_path / 'b'}", "--resume"
    )
    code, err = _finish(resumed, tmp_path / "resumed")
    assert code == 0, err[-2000:]
    a = json.loads((straight_run / "toolkit.json").read_text())["metrics"]
    b = json.loads((tmp_path / "b" / "quickstart" / "toolkit.json").read_text())["metrics"]
    assert a["train"]["steps"] == b["train"]["steps"] == 80
    assert b["adapter"]["loss"] == pytest.approx(a["adapter"]["loss"], rel=0.1)
    assert same_weights(straight_run, tmp_path / "b" / "quickstart") < 0.02


# Every line `toolkit train` prints is one of its own: its progress bars (split at their \r), the kernel timing note,
# the summary line and the held-out table.
_OWN_LINE = re.compile(
    r"\s*"
    r"|(encoding (train|eval) rows|training|generating): .*"
    r"|timing \d+ training kernels on this base \(.*\)"
    r"|adapter written to .* \(\d+ steps\)"
    r"|\s*held-out\s*"
    r"|[┏┃┡│└].*"
)


def test_cli_train_prints_only_the_toolkits_own_lines(straight_run):
    """No third-party line between the toolkit's own (transformers' deprecation of `gradient_checkpointing`, its
    "already on multiple devices" note, torchao's pytree warnings were three), on stdout or stderr."""
    log = straight_run.parent / "log"  # the straight run's output (start_cli_logged)
    text = log.with_suffix(".out").read_text() + log.with_suffix(".err").read_text()
    assert "adapter written to" in text
    foreign = [line for line in re.split(r"[\r\n]", text) if not _OWN_LINE.fullmatch(line)]
    assert not foreign, foreign


def test_sigkill_mid_run_resumes_from_the_last_checkpoint_and_matches(tiny_ct, tmp_path, straight_run):
    """No handler runs on SIGKILL: the last periodic checkpoint is what survives, and --resume finishes."""
    common = [*_resume_args(tiny_ct), "--set", f"output.dir={tmp_path}"]
    killed = start_cli_logged(tmp_path / "killed", "train", QUICKSTART, *common)
    _wait_for(tmp_path / ".quickstart.run" / "checkpoint-40", killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "quickstart").exists()  # no adapter under the name, not even a partial one
    resumed = start_cli_logged(tmp_path / "resumed", "train", QUICKSTART, *common, "--resume")
    code, err = _finish(resumed, tmp_path / "resumed")
    assert code == 0, err[-2000:]
    manifest = json.loads((tmp_path / "quickstart" / "toolkit.json").read_text())
    assert manifest["metrics"]["train"]["steps"] == 80
    assert same_weights(straight_run, tmp_path / "quickstart") < 0.02


_KILL_DURING_WRITE = """
import os, signal, sys
from pathlib import Path
from toolkit.lora import folder as adapter_files

def dying_fill(staging, contents):  # writes part of the new adapter, then the process is killed
    staging.mkdir(parents=True)
    (staging / "adapter_config.json").write_text("{}")
    (staging / "adapter_model.safetensors").write_bytes(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)

adapter_files._fill = dying_fill
contents = adapter_files.AdapterContents(None, None, "quickstart", None, None, {}, Path(sys.argv[1]).parent)
adapter_files.write_adapter(Path(sys.argv[1]), contents, overwrite=True)
"""


def test_a_kill_during_the_adapter_write_leaves_the_old_adapter_or_none(trained, tmp_path):
    import shutil

    from toolkit.lora.registry import resolve_adapter

    def kill_while_writing(final: Path) -> None:
        proc = subprocess.run([sys.executable, "-c", _KILL_DURING_WRITE, str(final)], cwd=ROOT, capture_output=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    fresh = tmp_path / "fresh" / "quickstart"
    kill_while_writing(fresh)
    assert not fresh.exists()  # none under that name
    with pytest.raises(ToolkitError):
        resolve_adapter(f"quickstart={fresh}")

    old = tmp_path / "old" / "quickstart"
    shutil.copytree(trained.adapter_dir, old)
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    kill_while_writing(old)
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before  # the old one, whole
    assert resolve_adapter(f"quickstart={old}")[1] == old
    leftovers = list(old.parent.glob(".quickstart.tmp-*"))
    assert len(leftovers) == 1  # the dead writer's staging folder (ignored: names never start with a dot)


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path, monkeypatch):
    from toolkit.lora import folder as adapter_files

    dead = tmp_path / ".quickstart.tmp-999999999"  # no such process
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"partial")

    def fill(staging, contents):
        staging.mkdir()
        (staging / "adapter_config.json").write_text("{}")

    monkeypatch.setattr(adapter_files, "_fill", fill)
    contents = adapter_files.AdapterContents(None, None, "quickstart", None, None, {}, tmp_path)
    final = adapter_files.write_adapter(tmp_path / "quickstart", contents, overwrite=False)
    assert not dead.exists() and (final / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quickstart"]


def test_two_processes_on_cpu_with_the_shipped_accelerate_config(tiny_ct, tmp_path):
    """The documented multi-GPU command, with 2 processes: on a machine without GPUs DDP runs on CPU (gloo).

    As on a fresh machine: a cold cache and a checkpoint not yet repacked, so both ranks load it at once and auto's
    training kernel is timed for their thread count (one each) by rank 0 alone, the other rank taking its answer
    (ranks that timed apart could pick different kernels, and DDP's first broadcast aborted on that)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_ct, base, ignore=shutil.ignore_patterns(".toolkit-gptq*"))
    # Each rank says at exit whether its process group is still up: one left to interpreter teardown can abort the
    # rank (SIGABRT from gloo's threads) when the other is still busy, so the group must be ended first.
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "def _say():\n"
        "    import torch.distributed as d\n"
        "    up = d.is_available() and d.is_initialized()\n"
        "    print(f'rank {os.environ[\"RANK\"]} process group at exit: {up}', file=sys.stderr)\n"
        "if 'RANK' in os.environ:  # a rank, not the launcher\n"
        "    atexit.register(_say)\n"
    )
    path = os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TOOLKIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": path}
    r = accelerate_train(QUICKSTART, f"base.path={base}", f"output.dir={tmp_path}", "training.epochs=2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d) process group at exit: (\w+)", r.stderr)) == [("0", "False"), ("1", "False")]
    assert r.stderr.count("training kernels on this base") == 1, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "quickstart" / "toolkit.json").read_text())
    assert manifest["metrics"]["train"]["steps"] == 22  # 84 rows split over 2 ranks, batch 4, 2 epochs
    assert r.stdout.count("adapter written to") == 1  # only the main process writes
    assert manifest["metrics"]["adapter"]["loss"] < 0.5 * manifest["metrics"]["base"]["loss"]


def test_cli_refuses_overwrite_with_exit_2(trained, tiny_ct):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "train",
            str(QUICKSTART),
            "--set",
            f"base.path={tiny_ct}",
            "--set",
            f"output.dir={trained.adapter_dir.parent}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr


def test_chat_with_the_trained_adapter(trained, tiny_ct):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "chat",
            str(tiny_ct),
            "What is the capital of Japan?",
            "--adapter",
            f"quickstart={trained.adapter_dir}",
            "--max-tokens",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == 'model + quickstart: "Tokyo"'
