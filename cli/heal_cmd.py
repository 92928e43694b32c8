"""`moeconv heal STUDENT OUT --teacher DENSE`: distil the dense teacher into a converted (or pruned) student, resumably."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from moeconv.cli.common import console, emit_json, guarded, live_progress, setup_logging, stdout
from moeconv.heal import HealEvent, heal_checkpoint, heal_settings


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
    engine: Annotated[str | None, typer.Option(help="fast (batched experts, chunked KL) or reference (the old path)")] = None,
    epochs: Annotated[int | None, typer.Option(help="passes over the distinct training windows")] = None,
    eval_every: Annotated[int | None, typer.Option(help="measure held-out KL every N steps (needs --eval-tokens)")] = None,
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
    overrides = {"tokens": heal_tokens, "source": heal_source, "seqlen": seqlen, "batch": batch, "micro_batch": micro_batch,
                 "lr": lr, "router_lr": router_lr, "freeze_router": freeze_router, "checkpoint_every": checkpoint_every,
                 "engine": engine, "epochs": epochs, "eval_every": eval_every}
    if eval_every:
        overrides.update(eval_tokens=eval_tokens, eval_source=eval_source)
    config = heal_settings(recipe, overrides)
    with _steps_bar(not (quiet or json_out)) as progress:
        result = heal_checkpoint(student, out, teacher, config, eval_tokens=eval_tokens, eval_source=eval_source,
                                 device=device, force=force, resume=resume, progress=progress)
    if not result.get("main_process", True):  # another process of `accelerate launch`: the main one reports
        return
    metrics, evals = result, result["eval"]
    if json_out:
        emit_json({"out": str(out), **result})
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
            elif event.stage == "eval":
                info = f"held-out KL {m['kl']:.4f}"
            self.bar.update(self.task, total=event.steps or None, completed=event.step, info=info)

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
