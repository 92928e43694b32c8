"""`export`: plan, measure a mapped routing, write into OUT.partial/ and rename, for any registered target."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from moeconv.calib.capture import tokenize_windows
from moeconv.calib.sources import load_text
from moeconv.errors import MoeconvError
from moeconv.export.registry import ExportError, ExportOptions, ExportPlan, get_target
from moeconv.export.routing import calibrate
from moeconv.export.source import ExportSource, open_source
from moeconv.io.load import load_model, load_tokenizer
from moeconv.io.writer import PartialOutput
from moeconv.jobs import check_destination, job_fingerprint, run_job

log = logging.getLogger(__name__)
CHECK_SEQLEN = 128


def check_ids(src: ExportSource, tokens: int, seqlen: int = CHECK_SEQLEN) -> tuple[torch.Tensor, str]:
    """Token windows [B, seqlen] to measure a mapped routing on: the conversion's calibration text when the checkpoint
    has a tokenizer, else seeded random ids.  -> (ids, where they came from)"""

    seqlen = min(seqlen, tokens)
    try:
        recipe = yaml.safe_load((src.path / "recipe.yaml").read_text()) if (src.path / "recipe.yaml").is_file() else {}
        calib = (recipe or {}).get("calibration") or {}
        text = load_text(calib.get("source", "shakespeare"), calib.get("text_field", "text"))
        ids = tokenize_windows(load_tokenizer(src.path), text, tokens, seqlen, purpose="routing check")
        return ids.clamp_max(src.base.vocab_size - 1), f"{text.name} ({ids.numel()} tokens)"
    except MoeconvError as err:
        log.info("routing check on random ids: %s", err)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, src.base.vocab_size, (-(-tokens // seqlen), seqlen), generator=generator)
    return ids, f"random ids ({ids.numel()} tokens)"


def _measure(src: ExportSource, plan: ExportPlan, options: ExportOptions, progress: Callable[[str], None]) -> dict:

    if options.check_tokens <= 0:
        raise ExportError("mapping weight-1 routing needs check tokens to choose each router's scale; pass --check-tokens N "
                          "(N > 0), or convert with configs/dot-moe-softmax.yaml for an exact export")
    progress("measuring the routing map")
    model = load_model(src.path, dtype="float32", device="cpu")
    ids, where = check_ids(src, options.check_tokens)
    calibrate(model, src.moe, plan.routing_map, ids, options.route_epsilon)
    return {**plan.routing_map.measured, "check_text": where}


def export(
    src: str | Path,
    out: str | Path,
    to: str,
    options: ExportOptions | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[str], None] = lambda stage: None,
) -> ExportPlan | dict:
    """Export SRC (a moeconv checkpoint; a dense model for gguf) to OUT in format `to`.  -> plan (dry run) or result."""
    options = options or ExportOptions()
    src_path, out = Path(src).expanduser(), Path(out)
    target = get_target(to)
    check_destination(src_path, out, force=True)  # OUT's own state is checked after the plan, which --dry-run prints regardless
    source = open_source(src_path)
    plan = target.plan(source, options)
    if dry_run:
        return plan
    check_destination(src_path, out, force)
    measured = _measure(source, plan, options, progress) if plan.routing == "mapped" else {}
    fingerprint = job_fingerprint(source=str(src_path.resolve()), target=to, options=repr(options))

    def work(partial: PartialOutput) -> dict:
        written = target.write(source, plan, options, partial, progress)
        result = {"out": str(out), "source": str(src_path), "target": to, "architecture": plan.architecture,
                  "routing": plan.routing, "routing_detail": plan.routing_detail, "measured": measured,
                  "notes": plan.notes, "dtype": written.pop("dtype", plan.dtype), **written}
        # provenance.json marks OUT as a moeconv output (so --force may replace it) and records what was done
        partial.write_json("provenance.json", {"export": result})
        return result

    result = run_job(out, fingerprint, work, force=force, resume=False)
    progress("complete")
    return result
