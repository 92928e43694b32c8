"""Heal (end-to-end distillation): lowers held-out KL, per-group router clip, exact resume, bad inputs; pruning baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from heal_support import SEQ, heal_models, one_thread  # noqa: F401 - one_thread: an autouse fixture
from typer.testing import CliRunner

import moeconv.convert as convert_mod
import moeconv.heal.train as heal_train
from conftest import build_dense
from moeconv.calib.sources import TextSource
from moeconv.cli.app import app
from moeconv.config import HealConfig, heal_config, load_recipe
from moeconv.convert import convert
from moeconv.errors import DataError, MoeconvError, RecipeError
from moeconv.heal import distill_metrics, heal, parameter_groups, straight_through_routing
from moeconv.heal.groups import BODY, GROUPS
from moeconv.io.load import load_model
from moeconv.prune import neuron_importance, prune_ffn_to_active


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return heal_models(tmp_path_factory.mktemp("heal"))


def _cfg(models, **kw) -> HealConfig:
    base = dict(tokens=SEQ * 4 * 8, seqlen=SEQ, batch=4, micro_batch=2, lr=3e-3, warmup=0.1, source=str(models["train"]),
                checkpoint_every=0)
    return HealConfig(**{**base, **kw})


def _load(models, which="moe"):
    return load_model(models[which], device="cpu")


def _body(model) -> dict[str, torch.Tensor]:
    groups = parameter_groups(model)
    return {n: p.detach().clone() for g in BODY for n, p in groups[g]}


def _routers(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in parameter_groups(model)["router"]}


def _delta(after: dict, before: dict) -> float:
    return math.sqrt(sum(float((after[n] - before[n]).pow(2).sum()) for n in before))


def test_heal_lowers_heldout_kl(models):
    student, teacher = _load(models), _load(models, "dense")
    before = distill_metrics(student, teacher, models["held"], 8)
    metrics = heal(student, teacher, models["tok"], _cfg(models, tokens=SEQ * 4 * 32, kl_weight=1.0, ce_weight=0.0))
    after = distill_metrics(student, teacher, models["held"], 8)
    assert before["kl"] > 0.05, before  # the converted student really differs from its teacher
    assert after["kl"] < 0.7 * before["kl"], (before, after)
    assert metrics["steps"] == 32 and len(metrics["history"]) == 32 and metrics["tokens"] == 32 * 4 * SEQ
    for key in ("grad_norm_router", "grad_norm_ffn", "grad_norm_attention", "grad_norm_other", "grad_norm_body"):
        assert all(math.isfinite(h[key]) for h in metrics["history"]), key
    assert metrics["train_router"] and metrics["straight_through_blocks"] == 2
    assert not student.training and all(p.requires_grad for p in student.parameters())


def test_straight_through_keeps_forward_and_feeds_router(models):
    student = _load(models)
    x = models["held"][:2]
    plain = student(input_ids=x).logits
    plain.sum().backward()
    assert all(p.grad is None for _, p in parameter_groups(student)["router"])  # hard top-k: no router gradient
    with straight_through_routing(student, True) as patched:
        ste = student(input_ids=x).logits
        ste.sum().backward()
    assert patched == 2 and torch.equal(plain, ste)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in parameter_groups(student)["router"])
    assert "route" not in vars(student.model.layers[0].mlp)  # patch removed


def _explode_router(model, factor=1e8):
    return [p.register_hook(lambda g: g * factor) for _, p in parameter_groups(model)["router"]]


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_exploding_router_gradient_does_not_starve_other_groups(models, monkeypatch, engine):
    """The router-stability guard: its own clip (and learning rate) keeps a diverging router from starving the rest."""
    teacher = _load(models, "dense")
    cfg = _cfg(models, tokens=SEQ * 4 * 4, engine=engine)
    runs = {}
    for name, explode in (("normal", False), ("exploding", True)):
        student = _load(models)
        body0, router0 = _body(student), _routers(student)
        hooks = _explode_router(student) if explode else []
        metrics = heal(student, teacher, models["tok"], cfg)
        for h in hooks:
            h.remove()
        runs[name] = (metrics, _delta(_body(student), body0), _delta(_routers(student), router0))
    (m_n, body_n, router_n), (m_x, body_x, router_x) = runs["normal"], runs["exploding"]
    assert m_x["grad_norm_max"]["router"] > 1e5 * max(m_n["grad_norm_max"]["router"], 1e-3)  # the explosion is real
    assert m_x["grad_norm_max"]["body"] < 100  # the rest of the model's gradient stays ordinary
    assert 0.5 < body_x / body_n < 2.0, (body_x, body_n)  # and it still learns at its normal pace
    assert 0 < router_x < 10 * max(router_n, 1e-6) and math.isfinite(router_x)

    # The same construction under one global clip (the measured pitfall) starves every other parameter.
    def global_clip(accelerator, params, body_params, config, state):
        everything = [p for g in GROUPS for p in params[g]]
        return {"grad_norm_router": 0.0, "grad_norm_body": float(accelerator.clip_grad_norm_(everything, config.clip))}

    monkeypatch.setattr(heal_train, "_clip_groups", global_clip)
    student = _load(models)
    body0 = _body(student)
    hooks = _explode_router(student)
    heal(student, teacher, models["tok"], cfg)
    for h in hooks:
        h.remove()
    assert _delta(_body(student), body0) < 0.1 * body_n


def test_frozen_router_stays_exact(models):
    student, teacher = _load(models), _load(models, "dense")
    body0, router0 = _body(student), _routers(student)
    metrics = heal(student, teacher, models["tok"], _cfg(models, tokens=SEQ * 4 * 2, freeze_router=True))
    assert not metrics["train_router"] and metrics["grad_norm_max"]["router"] == 0.0
    assert all(torch.equal(router0[n], p) for n, p in _routers(student).items())
    assert _delta(_body(student), body0) > 0


def test_interrupted_heal_resumes_to_identical_weights(models, tmp_path):
    teacher = _load(models, "dense")
    cfg = _cfg(models, tokens=SEQ * 4 * 5, checkpoint_every=2)
    reference = _load(models)
    ref_metrics = heal(reference, teacher, models["tok"], cfg, tmp_path / "a")

    class Interrupt(Exception):
        pass

    def stop_at_3(event):
        if event.stage == "step" and event.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        heal(_load(models), teacher, models["tok"], cfg, tmp_path / "b", stop_at_3)
    assert json.loads((tmp_path / "b" / "heal.json").read_text())["step"] == 2
    resumed = _load(models)  # a fresh process would load the unhealed student again
    metrics = heal(resumed, teacher, models["tok"], cfg, tmp_path / "b")
    assert metrics["resumed_from_step"] == 2
    ref_state, got = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref_state[n], got[n]) for n in ref_state)
    assert [h["loss"] for h in metrics["history"]] == [h["loss"] for h in ref_metrics["history"]]
    # A checkpoint of another recipe is refused rather than silently mixed in.
    with pytest.raises(MoeconvError, match="another student, recipe or text"):
        heal(_load(models), teacher, models["tok"], cfg.model_copy(update={"lr": 1e-3}), tmp_path / "b")


def test_bad_inputs_are_one_line_errors(models, tmp_path):
    student, tok = _load(models), models["tok"]
    other = load_model(build_dense("llama", tmp_path / "v80", vocab_size=80), device="cpu")
    with pytest.raises(MoeconvError, match=r"teacher vocabulary \(80\) differs from the student's \(96\)"):
        heal(student, other, tok, _cfg(models))
    short = TextSource("short", ["the of and to " * 10])
    with pytest.raises(DataError, match=r"heal text 'short' has 140 tokens but 1024 are needed") as err:
        heal(student, _load(models, "dense"), tok, _cfg(models), text=short)
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="micro_batch 8 exceeds batch 4"):
        heal(student, _load(models, "dense"), tok, _cfg(models, micro_batch=8))
    with pytest.raises(RecipeError, match="unknown field 'lrate'"):
        heal_config({"lrate": 1.0})
    with pytest.raises(RecipeError, match="'tokens'"):
        heal_config({"tokens": 0})


def _masked_reference(model, keep: list[torch.Tensor], x: torch.Tensor, down: str, path: str) -> torch.Tensor:
    """The unpruned model with every non-kept neuron's activation zeroed: what the pruned model must compute."""
    hooks = []
    for i, idx in enumerate(keep):
        mask = torch.zeros(model.get_submodule(path.format(i=i) + "." + down).weight.shape[0 if down == "c_proj" else 1])
        mask[idx] = 1
        hooks.append(model.get_submodule(path.format(i=i) + "." + down).register_forward_pre_hook(
            lambda m, a, mask=mask: (a[0] * mask,)))
    with torch.no_grad():
        out = model(input_ids=x).logits
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("family,down,path", [("llama", "down_proj", "model.layers.{i}.mlp"),
                                              ("phi3", "down_proj", "model.layers.{i}.mlp"),
                                              ("gpt2", "c_proj", "transformer.h.{i}.mlp")])
def test_prune_keeps_top_neurons_exactly(family, down, path, tmp_path):
    src = build_dense(family, tmp_path / family)
    model = load_model(src, device="cpu")
    calib = torch.randint(1, 96, (4, SEQ), generator=torch.Generator().manual_seed(3))
    x = torch.randint(1, 96, (2, SEQ), generator=torch.Generator().manual_seed(4))
    keep = [s.topk(36).indices for s in neuron_importance(model, calib)]
    expected = _masked_reference(model, keep, x, down, path)
    prune_ffn_to_active(model, 0.5, calib)
    assert model.prune_metrics["kept"] == 36
    with torch.no_grad():
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = load_model(tmp_path / "pruned", device="cpu")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, got)
    with pytest.raises(RecipeError, match="keep_fraction"):
        prune_ffn_to_active(load_model(src, device="cpu"), 1.5, calib)


def test_heal_on_pruned_dense_student(models):
    student, teacher = _load(models, "dense"), _load(models, "dense")
    prune_ffn_to_active(student, 0.5, models["held"][:4])
    assert parameter_groups(student)["router"] == []
    before = distill_metrics(student, teacher, models["held"], 8)
    metrics = heal(student, teacher, models["tok"], _cfg(models, tokens=SEQ * 4 * 32, kl_weight=1.0, ce_weight=0.0))
    assert not metrics["train_router"]
    assert distill_metrics(student, teacher, models["held"], 8)["kl"] < 0.8 * before["kl"]


def test_cli_heal_writes_student_format_and_resumes(models, tmp_path):
    runner = CliRunner()
    out = tmp_path / "healed"
    args = ["heal", str(models["moe"]), str(out), "--teacher", str(models["dense"]), "--heal-tokens", str(SEQ * 4 * 2),
            "--heal-source", str(models["train"]), "--seqlen", str(SEQ), "--batch", "4", "--lr", "1e-3", "--device", "cpu",
            "--eval-tokens", str(SEQ * 4), "--eval-source", str(models["train"]), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["eval"]["after"]["kl"] < summary["eval"]["before"]["kl"]
    from safetensors.torch import load_file

    (shard,) = [f.name for f in models["moe"].glob("*.safetensors")]
    src, dst = load_file(str(models["moe"] / shard)), load_file(str(out / shard))
    assert src.keys() == dst.keys() and all(src[k].dtype == dst[k].dtype and src[k].shape == dst[k].shape for k in src)
    assert any(not torch.equal(src[k], dst[k]) for k in src)
    assert (out / "config.json").read_text() == (models["moe"] / "config.json").read_text()
    assert (out / "heal.json").is_file() and not (out / "heal-state").exists()
    healed = load_model(out, device="cpu")
    assert all(torch.equal(healed.state_dict()[k], dst[k]) for k in dst)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["heal", str(models["moe"]), str(tmp_path / "x"), "--teacher", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def _convert_heal_recipe(models, heal_tokens: int):
    return load_recipe(None, {"experts": 4, "top_k": 2, "router.steps": 30, "calibration.source": str(models["train"]),
                              "calibration.tokens": 512, "calibration.seqlen": 64, "partition.method": "random",
                              "calibration.inputs": "dense",
                              "heal": {"tokens": heal_tokens, "seqlen": SEQ, "batch": 4, "micro_batch": 2, "lr": 3e-3,
                                       "warmup": 0.1, "kl_weight": 1.0, "ce_weight": 0.0, "source": str(models["train"]),
                                       "checkpoint_every": 0}})


def test_convert_with_heal_block_heals_and_resumes_after_a_crash_while_writing(models, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    recipe = _convert_heal_recipe(models, SEQ * 4 * 16)
    out = tmp_path / "healed"
    provenance = convert(str(models["dense"]), out, recipe)
    assert provenance["heal"]["steps"] == 16 and provenance["heal"]["tokens"] == SEQ * 4 * 16
    assert set(provenance["layers"]) == {"0", "1"}  # the per-layer metrics survive the heal
    assert not (out / "heal-state").exists() and not (out / "layer-metrics.json").exists()
    healed, plain = load_model(out, device="cpu"), load_model(models["moe"], device="cpu")
    assert distill_metrics(healed, _load(models, "dense"), models["held"])["kl"] < \
        distill_metrics(plain, _load(models, "dense"), models["held"])["kl"]

    # Killed while the healed shards are rewritten: --resume must finish from the saved last step.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "write_like_student", crash)
    again = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt):
        convert(str(models["dense"]), again, recipe)
    assert (tmp_path / "again.partial" / "heal-state").is_dir() and not again.exists()
    monkeypatch.undo()
    seen = {}  # heal's own report (its run-specific fields stay out of OUT, so provenance cannot say where it resumed)

    def spy(*args, **kwargs):
        seen.update(real_heal(*args, **kwargs))
        return seen

    real_heal = convert_mod.heal
    monkeypatch.setattr(convert_mod, "heal", spy)
    resumed = convert(str(models["dense"]), again, recipe, resume=True)
    assert seen["resumed_from_step"] == 16 and set(resumed["layers"]) == {"0", "1"}
    assert resumed["heal"] == provenance["heal"] and "seconds" not in resumed["heal"]
    for shard in out.glob("*.safetensors"):
        a, b = load_file(str(shard)), load_file(str(again / shard.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_cli_heal_tokens_flag_and_bad_heal_block(models, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["convert", str(models["dense"]), str(out), "--experts", "4", "--top-k", "2", "--calib", str(models["train"]),
            "--calib-tokens", "512", "--seqlen", "64", "--heal-tokens", "64", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    heal_info = json.loads(result.stdout)["heal"]
    assert heal_info["steps"] == 1 and heal_info["text"].endswith("train.txt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("experts: 4\ntop_k: 2\nheal:\n  tokns: 10\n")
    bad = runner.invoke(app, ["convert", str(models["dense"]), str(tmp_path / "x"), "--recipe", str(recipe)])
    assert bad.exit_code == 2 and "heal.tokns" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_prune_checkpoint_writes_a_loadable_smaller_model_and_never_overwrites(models, tmp_path):
    from moeconv.prune import prune_checkpoint

    out = tmp_path / "pruned"
    metrics = prune_checkpoint(str(models["dense"]), out, 0.25, calib_source=str(models["train"]), calib_tokens=256, seqlen=64)
    pruned = load_model(out, device="cpu")
    d_ff = metrics["d_ff"]
    assert metrics["kept"] == d_ff // 4 and pruned.model.layers[0].mlp.up_proj.weight.shape[0] == d_ff // 4
    assert not (tmp_path / "pruned.partial").exists()
    assert torch.isfinite(pruned(input_ids=models["held"][:1]).logits).all()
    with pytest.raises(MoeconvError, match="already exists"):
        prune_checkpoint(str(models["dense"]), out, 0.5, calib_source=str(models["train"]), calib_tokens=256, seqlen=64)


def test_dry_run_plan_states_the_heal_budget(models):
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(models["dense"]), str(models["root"] / "never"), "--experts", "4", "--top-k", "2",
                                 "--heal-tokens", "1000", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["heal_tokens"] == 8 * 512  # rounded up to one whole step of 8 windows of 512
    assert not (models["root"] / "never").exists() and not (models["root"] / "never.partial").exists()
