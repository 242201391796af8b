"""`toolkit` command line: parses flags, calls toolkit.*, prints. No logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from toolkit import constants as C
from toolkit.engine.engine import PREFILL_STEP_RATIO
from toolkit.errors import ToolkitError

app = typer.Typer(
    help="LoRA fine-tuning and serving toolkit for Gemma 3 27B (GPTQ 4-bit).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("tiny-base")
def tiny_base(
    dir: Annotated[Path, typer.Argument(help="Folder to write the base into.")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives identical tensors.")] = 0,
    size: Annotated[str, typer.Option(help="Shape preset: tiny, small or 27b-shapes.")] = "tiny",
    layers: Annotated[int | None, typer.Option(help="Override the preset's number of text layers.")] = None,
    context: Annotated[
        int | None, typer.Option(help="Override the preset's positions (32768: the 27B's context).")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="compressed-tensors (as the real base) or gptq.")] = (
        "compressed-tensors"
    ),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
    weights: Annotated[
        str,
        typer.Option(
            help="random (seeded) or gemma-3-270m: the real 270M language model from the `real` extra "
            "(Gemma terms of use), GPTQ-quantised once per machine and cached."
        ),
    ] = "random",
) -> None:
    """Build a small 4-bit Gemma 3 (random weights, or the real 270M) in the real checkpoint's on-disk format."""
    if weights != "random":
        from toolkit.base import real_weights

        if weights != real_weights.WEIGHTS_NAME:
            raise ToolkitError(
                f"unknown weights {weights!r}", where="--weights", fix=f"use random or {real_weights.WEIGHTS_NAME}"
            )
        out = real_weights.build(dir, fmt=format, overwrite=overwrite, progress=typer.echo)
        typer.echo(f"built {weights} Gemma 3 base ({format}; random vision tower) in {out}")
        typer.echo(f"  weights: {real_weights.WEIGHTS_SOURCE}; {real_weights.WEIGHTS_TERMS}")
        return
    from toolkit.base import builder as tb

    out = tb.build(dir, seed=seed, size=size, layers=layers, context=context, fmt=format, overwrite=overwrite)
    typer.echo(f"built {size} Gemma 3 base ({format}, seed {seed}) in {out}")


LmHeadOption = Annotated[
    str,
    typer.Option(
        help="LM head: auto (int8 on a CPU for a large head; see `toolkit info`), exact, int8 (its faster kernel, "
        "timed once per machine), int8-weight-only or int8-dynamic (int8 x int8, CPUs with VNNI)."
    ),
]


@app.command()
def info(
    dir: Annotated[str, typer.Argument(help="Base folder (or hub id).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    kernel: Annotated[str, typer.Option(help="GPTQ kernel to report on: auto (measured choice) or a name.")] = "auto",
    lm_head: LmHeadOption = "auto",
) -> None:
    """Summarise a 4-bit Gemma 3 base (architecture, size, quantisation, vision, context, tokens, kernel and dtype),
    or an adapter (a folder with adapter_config.json): the export targets it can go to, and why not."""
    from toolkit.base.info import describe, head_choice, kernel_choice, summary_lines

    if (Path(dir) / "adapter_config.json").is_file() or (Path("adapters") / dir / "adapter_config.json").is_file():
        from toolkit.lora.export import target_lines, targets

        found = targets(dir)
        typer.echo(json.dumps(found, indent=2) if as_json else "\n".join(["export targets:", *target_lines(found)]))
        return
    data = describe(dir)
    data["kernel"] = kernel_choice(device, kernel, base=dir)
    data["lm_head"] = head_choice(device, lm_head, data)
    typer.echo(json.dumps(data, indent=2) if as_json else "\n".join(summary_lines(data)))


@app.command()
def chat(
    base: Annotated[str, typer.Argument(help="Base folder (or hub id).")],
    message: Annotated[str, typer.Argument(help="The user message.")],
    image: Annotated[list[str] | None, typer.Option(help="Image path or data: URI to attach (repeatable).")] = None,
    system: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter NAME (in adapters/) or PATH to apply.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 24,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    kernel: Annotated[str, typer.Option(help="GPTQ kernel: auto (measured choice; see `toolkit info`) or a name.")] = (
        "auto"
    ),
    lm_head: LmHeadOption = "auto",
) -> None:
    """Send one message (optionally with images) to the base and print its greedy reply."""
    from toolkit.base.loader import load_base
    from toolkit.data import template as chat_mod
    from toolkit.data.schema import parse_messages
    from toolkit.engine.engine import generate_greedy

    content = [{"type": "text", "text": message}] + [
        {"type": "image_url", "image_url": {"url": src}} for src in image or []
    ]
    raw = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    messages = parse_messages(raw, purpose="request", where="message")
    images = chat_mod.load_images(messages, base_dir=Path.cwd(), policy=None, where="--image")
    loaded = load_base(base, device=device, kernel=kernel, lm_head=lm_head)
    if adapter:
        import dataclasses

        from toolkit.lora.registry import attach, resolve_adapter

        name, folder = resolve_adapter(adapter)
        loaded = dataclasses.replace(loaded, model=attach(loaded, [(name, folder)]))
        adapter = name
    inputs = chat_mod.encode_prompt(loaded.processor, messages, images).tensors()
    reply = loaded.tokenizer.decode(
        generate_greedy(loaded, inputs, max_new_tokens=max_tokens), skip_special_tokens=True
    )
    typer.echo(f"user: {message}" + (f" [+{len(image)} image(s)]" if image else ""))
    typer.echo(f"model{f' + {adapter}' if adapter else ''}: {json.dumps(reply)}")  # quoted: blank replies show


SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe key: --set section.key=value (repeatable).")
]


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    overrides: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    dump: Annotated[
        Path | None, typer.Option(help="Write each encoded row's input_ids and labels (-100: not trained) as JSONL.")
    ] = None,
    show: Annotated[int, typer.Option(help="Print N encoded rows with the trained tokens between [[ and ]].")] = 0,
) -> None:
    """Check a recipe and read and encode its whole dataset; print rows, tokens, images, skipped, longest row."""
    from toolkit.data.datasets import load_recipe_data, summary_lines
    from toolkit.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    rewards = []
    if loaded.training.method == "grpo":  # every reward loads (a user function's file, name, syntax) before the data
        from toolkit.eval.rewards import build_rewards

        rewards = build_rewards(loaded.training.rewards, Path(loaded.source).parent)
    report = load_recipe_data(loaded)
    summary = report.summary()
    if dump or show:
        from toolkit.base.loader import load_processor
        from toolkit.data.dump import dump_rows, show_rows

        if dump:
            typer.echo(f"wrote {dump_rows(report, dump)} encoded rows to {dump}", err=as_json)
        if show:
            tokenizer = load_processor(loaded.base.path).tokenizer
            typer.echo("\n".join(show_rows(report, tokenizer, show)), err=as_json)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"recipe {recipe}: ok (adapter {loaded.adapter_name!r}, base {loaded.base.path})")
    for line in summary_lines(summary, detected=loaded.data.format == "auto"):
        typer.echo(line)
    if rewards:
        typer.echo("  rewards " + " + ".join(f"{r.weight:g} x {r.name}" for r in rewards))


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint of an unfinished run.")] = False,
    output: Annotated[str | None, typer.Option(help="Adapter name (default: the recipe's output.name).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter of that name.")] = False,
) -> None:
    """Train a QLoRA adapter on the frozen 4-bit base; write adapters/<name>/ (PEFT files + manifest)."""
    from toolkit.recipe import load_recipe
    from toolkit.train.trainer import train as run_training

    result = run_training(load_recipe(recipe, overrides), resume=resume, overwrite=overwrite, output_name=output)
    if result.interrupted:
        typer.echo(
            f"interrupted at step {result.step}; checkpoint {result.metrics['checkpoint']}; "
            f"continue with: toolkit train {recipe} --resume",
            err=True,
        )
        raise typer.Exit(130)
    if result.adapter_dir is None:
        return  # not the main process
    typer.echo(f"adapter written to {result.adapter_dir} ({result.step} steps)")
    if "adapter" in result.metrics:
        from rich.console import Console

        from toolkit.eval.report import rich_table

        m = result.metrics
        columns = [c for c in ("base", "reference", "adapter") if c in m]
        Console().print(rich_table("held-out", {c: m[c] for c in columns}, columns))


@app.command("eval")
def evaluate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (its data, base and eval sections).")],
    adapter: Annotated[
        list[str] | None, typer.Option(help="NAME or NAME=PATH (or a served model with --url); repeatable.")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="A file of messages rows instead of the recipe's held-out rows.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: build/eval/<recipe>).")] = None,
    minimum: Annotated[
        list[str] | None, typer.Option("--min", help="METRIC=VALUE an adapter must reach; repeatable.")
    ] = None,
    maximum: Annotated[
        list[str] | None, typer.Option("--max", help="METRIC=VALUE (loss, perplexity) not to exceed.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Evaluate an OpenAI-compatible server (e.g. http://host:8000/v1) instead.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="TOOLKIT_API_KEY", help="Bearer key for --url.")] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Preference rows: the reference of the DPO reward accuracy (an adapter, or base)."),
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Compare the base and adapters on held-out rows: table, report files; with --min/--max, exit 1 on a miss."""
    from rich.console import Console

    from toolkit.eval.report import report_table
    from toolkit.eval.run import run_eval
    from toolkit.recipe import load_recipe

    result = run_eval(
        load_recipe(recipe, overrides),
        adapters=adapter,
        data=data,
        out=out,
        mins=minimum,
        maxs=maximum,
        url=url,
        api_key=api_key,
        reference=reference,
    )
    Console().print(report_table(result.report))
    typer.echo(f"report: {result.out_dir}/report.md (report.json, answers.jsonl, chart.png)")
    for line in result.failures:
        typer.echo(line, err=True)
    if result.failures:
        raise typer.Exit(1)


@app.command()
def serve(
    base: Annotated[str | None, typer.Option(help="Base folder or hub id (default: the first adapter's base).")] = None,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME (in adapters/) or NAME=PATH; repeatable.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="TOOLKIT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*.")
    ] = None,
    allow_private_urls: Annotated[bool, typer.Option(help="Let image URLs reach private addresses.")] = False,
    allowed_media_dir: Annotated[str | None, typer.Option(help="Serve file: image URLs from this folder.")] = None,
    max_batch: Annotated[int, typer.Option(help="Most sequences decoded together.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Most waiting requests; beyond it: 429.")] = 64,
    max_tokens_limit: Annotated[
        int | None, typer.Option(help="Most tokens one request may ask for (default: what the context allows).")
    ] = None,
    kv_cache_gb: Annotated[
        float | None,
        typer.Option(help="KV cache budget in GB: a request that can never fit gets a 400, others wait for room."),
    ] = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help="Prompt tokens per prefill pass, between decoding steps (0: whole prompts).")
    ] = None,
    prefill_pacing: Annotated[
        float,
        typer.Option(help="While streams run, a prompt chunk costs about this many decoding steps (0: fixed chunks)."),
    ] = PREFILL_STEP_RATIO,
    in_process: Annotated[
        bool, typer.Option(help="Run the engine in the server's process (default: a process of its own).")
    ] = False,
    compiled_step: Annotated[
        bool,
        typer.Option(help="Compile one stream's decoding step where it pays (a CPU engine in its own process)."),
    ] = True,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MiB; beyond it: 413.")] = 32.0,
    max_images: Annotated[int, typer.Option(help="Most images in one request.")] = C.MAX_IMAGES_PER_REQUEST,
    allow_runtime_adapters: Annotated[
        bool, typer.Option(help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (adapters folder only).")
    ] = False,
    responses_store: Annotated[
        int,
        typer.Option(help="Most /v1/responses kept in memory for GET and previous_response_id (0: none)."),
    ] = C.RESPONSES_STORE,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    kernel: Annotated[str, typer.Option(help="GPTQ kernel: auto (measured choice; see `toolkit info`) or a name.")] = (
        "auto"
    ),
    lm_head: LmHeadOption = "auto",
    playground: Annotated[bool, typer.Option(help="Serve the browser playground at /playground.")] = True,
    eval_dir: Annotated[
        Path, typer.Option(help="Eval reports the playground shows (`toolkit eval`'s folders).")
    ] = Path("build/eval"),
    engine: Annotated[str, typer.Option(help="toolkit (built in) or vllm (hand off to `vllm serve`).")] = "toolkit",
    dry_run: Annotated[bool, typer.Option(help="With --engine vllm: print the vLLM command, do not run it.")] = False,
) -> None:
    """Serve OpenAI-compatible /v1/chat/completions and /v1/completions for the base and its adapters."""
    if engine not in ("toolkit", "vllm"):
        raise ToolkitError(f"unknown engine {engine!r}", where="--engine", fix="use toolkit or vllm")
    if engine == "vllm":
        from toolkit.serve import vllm_handoff

        command = vllm_handoff.plan(
            base, adapter or [], host=host, port=port, api_key=api_key, max_images=max_images, max_batch=max_batch
        )
        for c in command.checks:
            typer.echo(f"adapter {c.name}: rank {c.rank}, {c.modules} modules, loadable by vLLM", err=True)
        if dry_run:
            typer.echo(command.shell())
            return
        vllm_handoff.exec_vllm(command)
        return
    if dry_run:
        raise ToolkitError("--dry-run only applies to --engine vllm", where="--dry-run", fix="add --engine vllm")
    import uvicorn

    from toolkit.serve.app import build_state, create_app

    state = build_state(
        base=base,
        adapters=adapter or [],
        api_key=api_key,
        device=device,
        kernel=kernel,
        lm_head=lm_head,
        allow_private_urls=allow_private_urls,
        allowed_media_dir=allowed_media_dir,
        max_batch=max_batch,
        max_queue=max_queue,
        max_tokens_limit=max_tokens_limit,
        max_body_mb=max_body_mb,
        max_images=max_images,
        kv_cache_gb=kv_cache_gb,
        prefill_chunk=prefill_chunk,
        prefill_pacing=prefill_pacing or None,
        engine_process=not in_process,
        compiled_step=compiled_step,
        allow_runtime_adapters=allow_runtime_adapters,
        responses_store=responses_store,
        playground=playground,
        eval_dir=str(eval_dir),
    )
    names = ", ".join([state.served_name, *state.adapters])
    typer.echo(f"serving {names} on http://{host}:{port}/v1 (auth {'on' if api_key else 'off'})")
    typer.echo(f"one stream's decoding step: {state.engine.step_kind}")
    typer.echo(f"LM head: {state.base.head_kernel or state.base.head}")  # e.g. "int8-dynamic, auto (timed ...)"
    if playground:
        typer.echo(f"playground: http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/playground")
    # loop and http stay "auto": uvicorn then runs on uvloop and httptools (installed with the toolkit, except
    # uvloop on Windows); tests/serve/test_server.py checks that they resolve
    uvicorn.run(create_app(state), host=host, port=port, log_level="warning")


@app.command("export")
def export_adapter(
    adapter: Annotated[str, typer.Argument(help="Adapter NAME (in adapters/), NAME=PATH or a folder path.")],
    to: Annotated[str, typer.Option(help="gguf (llama.cpp / Ollama LoRA), merged (plain transformers) or vllm.")] = "",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: build/export/<name>-<target>).")] = None,
    base: Annotated[str | None, typer.Option(help="Base folder (default: the one the adapter was trained on).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    gguf_base: Annotated[
        str | None, typer.Option(help="--to gguf: the base GGUF the Modelfile's FROM line names.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="--to merged: bfloat16 or float32.")] = "bfloat16",
    quantize: Annotated[
        str | None,
        typer.Option(help="--to merged: gptq quantises the merged model again into the base's 4-bit format."),
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="--quantize gptq: rows to calibrate on (default: the adapter's training data).")
    ] = None,
    max_lora_rank: Annotated[
        int | None, typer.Option(help="--to vllm: the --max-lora-rank to serve with (default: the smallest that fits).")
    ] = None,
    check: Annotated[bool, typer.Option(help="Only say which targets the adapter can go to, and why not.")] = False,
) -> None:
    """Export an adapter where people run models: a GGUF LoRA, a merged transformers model, a checked vLLM folder."""
    from toolkit.lora.export import export, target_lines, targets

    if check:
        typer.echo("\n".join(target_lines(targets(adapter, base=base))))
        return
    if not to:
        raise ToolkitError("no export target", where="--to", fix="pass --to gguf, --to merged or --to vllm")
    done = export(
        adapter,
        to,
        out=out,
        base=base,
        overwrite=overwrite,
        gguf_base=gguf_base,
        dtype=dtype,
        max_lora_rank=max_lora_rank,
        quantize=quantize,
        calibration=calibration,
        progress=lambda line: typer.echo(line, err=True),
    )
    typer.echo(f"exported {adapter} to {to}: {done.out} ({', '.join(done.files)})")
    for line in done.lines:
        typer.echo(line)


@app.command("recipe-reference")
def recipe_reference() -> None:
    """Print the recipe reference (docs/RECIPES.md) generated from the recipe schema."""
    from toolkit.recipe import reference_markdown

    typer.echo(reference_markdown(), nl=False)


@app.command("make-image")
def make_image(
    path: Annotated[Path, typer.Argument(help="PNG file to write.")],
    color: Annotated[str, typer.Option(help="Colour of the square (a PIL colour name).")] = "red",
    size: Annotated[int, typer.Option(help="Width and height in pixels.")] = 64,
) -> None:
    """Write a small test image (a coloured square on white) for trying image input offline."""
    from toolkit.data.images import make_square_image

    make_square_image(path, color=color, size=size)
    typer.echo(f"wrote {path}")


def main() -> None:
    from toolkit.quiet import quiet_third_party

    quiet_third_party()
    try:
        app()
    except ToolkitError as exc:
        typer.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
