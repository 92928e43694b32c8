"""`moeconv heal STUDENT OUT --teacher DENSE`: distil the dense teacher into a converted (or pruned) student, resumably."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Annotated

import torch
import typer
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from moeconv.cli.common import console, emit_json, guarded, live_progress, setup_logging, stdout
from moeconv.errors import CheckpointError, RecipeError
from moeconv.heal import HealEvent, distill_metrics, heal, heal_config, write_like_student
from moeconv.io.load import is_moeconv_checkpoint, load_model, load_tokenizer
from moeconv.io.writer import PartialOutput

CHECKPOINT = "heal-state"


def _recipe_block(path: Path | None) -> dict:
    """The `heal:` block of a convert recipe, or a whole file of heal fields."""
    if path is None:
        return {}
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; pass a YAML file with a heal: block")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping (a heal: block or heal fields)")
    block = data.get("heal", data) if "heal" in data else data
    if not isinstance(block, dict):
        raise RecipeError(f"{path}: heal: must be a mapping of heal fields")
    return dict(block)


def _fingerprint(student: str, teacher: str, config_json: str) -> str:
    digest = hashlib.sha256(f"{Path(teacher).resolve()}|{config_json}".encode())
    folder = Path(student)
    for f in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
        if f.is_file():
            digest.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return digest.hexdigest()


@guarded
def heal_command(
    student: Annotated[str, typer.Argument(help="moeconv MoE checkpoint, or a (pruned) dense model folder")],
    out: Annotated[Path, typer.Argument(help="output folder (written to OUT.partial/ first; checkpoints live there)")],
    teacher: Annotated[str, typer.Option(help="the dense model to distil from: folder or .gguf")],
    heal_tokens: Annotated[int | None, typer.Option(help="training tokens")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML with a heal: block (a convert recipe) or heal fields")] = None,
    heal_source: Annotated[str | None, typer.Option(help="training text: built-in corpus, file or folder")] = None,
    seqlen: Annotated[int | None, typer.Option(help="tokens per window")] = None,
    batch: Annotated[int | None, typer.Option(help="windows per optimizer step")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="windows per forward")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    router_lr: Annotated[float | None, typer.Option(help="peak learning rate of the routers")] = None,
    freeze_router: Annotated[bool | None, typer.Option("--freeze-router/--train-router", help="keep routers fixed")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="steps between checkpoints (0: none)")] = None,
    eval_tokens: Annotated[int, typer.Option(help="measure KL and perplexity before/after on this many held-out tokens")] = 0,
    eval_source: Annotated[str, typer.Option(help="held-out text for --eval-tokens")] = "shakespeare:heldout",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    force: Annotated[bool, typer.Option(help="replace an existing OUT")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted heal from its last checkpoint")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable result on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    """Train every parameter of STUDENT end to end to match TEACHER's logits (KL + LM loss), under the student's routing."""
    setup_logging(verbose, quiet)
    block = _recipe_block(recipe)
    overrides = {"tokens": heal_tokens, "source": heal_source, "seqlen": seqlen, "batch": batch, "micro_batch": micro_batch,
                 "lr": lr, "router_lr": router_lr, "freeze_router": freeze_router, "checkpoint_every": checkpoint_every}
    config = heal_config({**block, **{k: v for k, v in overrides.items() if v is not None}}, str(recipe or "heal options"))
    student_dir = Path(student)
    moe = is_moeconv_checkpoint(student_dir)
    if moe and json.loads((student_dir / "config.json").read_text()).get("moe", {}).get("quant"):
        raise RecipeError(f"{student} is quantized; heal the unquantized MoE, then quantize it")
    with PartialOutput(out, _fingerprint(student, teacher, config.model_dump_json()), resume=resume, force=force) as partial:
        try:
            tokenizer = load_tokenizer(student)
        except CheckpointError:
            tokenizer = load_tokenizer(teacher)
        dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(student, "float32", dev)
        dense = load_model(teacher, "float32", dev)

        evals = {}
        held = None
        if eval_tokens:
            from moeconv.calib.capture import tokenize_windows
            from moeconv.calib.sources import load_text

            held = tokenize_windows(tokenizer, load_text(eval_source), eval_tokens, config.seqlen)
            evals["before"] = distill_metrics(model, dense, held)
        with _steps_bar(not (quiet or json_out)) as progress:
            metrics = heal(model, dense, tokenizer, config, partial.path / CHECKPOINT, progress, device=dev, resume=resume)
        if held is not None:
            evals["after"] = distill_metrics(model, dense, held)
        if moe or (student_dir.is_dir() and any(student_dir.glob("*.safetensors"))):
            write_like_student(model, student_dir, partial)
        else:  # a .gguf or .bin dense student: written as a transformers folder
            partial.write_saved(model.save_pretrained)
            partial.write_saved(tokenizer.save_pretrained)
        summary = {k: v for k, v in metrics.items() if k != "history"}
        partial.write_json("heal.json", {**metrics, "teacher": teacher, "student": student, "eval": evals})
        shutil.rmtree(partial.path / CHECKPOINT, ignore_errors=True)
        partial.finalize()
    if json_out:
        emit_json({"out": str(out), **summary, "eval": evals})
    elif not quiet:
        final, peak = metrics["final"], metrics["grad_norm_max"]
        line = (f"wrote {out}: {metrics['steps']} steps, {metrics['tokens']} tokens in {metrics['seconds']:.0f} s; "
                f"last KL {final.get('kl', float('nan')):.4f}, CE {final.get('ce', float('nan')):.4f}; "
                f"max grad norm router {peak['router']:.3g}, rest {peak['body']:.3g}")
        if evals:
            b, a = evals["before"], evals["after"]
            line += f"; held-out KL {b['kl']:.4f} -> {a['kl']:.4f}, ppl {b['ppl']:.2f} -> {a['ppl']:.2f} (teacher {a['teacher_ppl']:.2f})"
        stdout.print(line)


class _steps_bar:
    """A progress callback drawing steps, loss and per-group gradient norms."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and live_progress()  # no frames in a log file

    def __enter__(self):
        if not self.enabled:
            return lambda event: None
        self.bar = Progress(TextColumn("heal"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            TextColumn("{task.fields[info]}"), console=console)
        self.bar.__enter__()
        self.task = self.bar.add_task("heal", total=None, info="tokenizing")

        def update(event: HealEvent) -> None:
            m = event.metrics
            info = event.stage
            if event.stage == "step":
                g = m["grad_norm"]
                info = f"loss {m['loss']:.3f} kl {m['kl']:.3f} |g| router {g['grad_norm_router']:.2g} rest {g['grad_norm_body']:.2g}"
            self.bar.update(self.task, total=event.steps or None, completed=event.step, info=info)

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
