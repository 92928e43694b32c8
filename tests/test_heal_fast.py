"""The fast heal engine (issue 17): the chunked KL/CE and the batched experts compute the reference objective and
its gradients; epochs, the wsd schedule, the held-out KL curve (heal.json + plot) and their bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from heal_support import SEQ, heal_models, one_thread  # noqa: F401 - one_thread: an autouse fixture
from typer.testing import CliRunner

import moeconv.heal.chunked as chunked
import moeconv.heal.objective as objective
import moeconv.heal.train as heal_train
from conftest import build_dense
from moeconv.calib.capture import tokenize_windows
from moeconv.calib.sources import TextSource, load_text
from moeconv.cli.app import app
from moeconv.config import HealConfig
from moeconv.errors import DataError
from moeconv.heal import distill_metrics, heal
from moeconv.heal.fast import batched_experts, fast_distill_loss
from moeconv.heal.groups import straight_through_routing
from moeconv.heal.objective import distill_loss, training_windows
from moeconv.heal.train import lr_factor, mixed_precision
from moeconv.io.load import load_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return heal_models(tmp_path_factory.mktemp("heal-fast"))


def _cfg(models, **kw) -> HealConfig:
    base = dict(tokens=SEQ * 4 * 8, seqlen=SEQ, batch=4, micro_batch=2, lr=3e-3, warmup=0.1, source=str(models["train"]),
                checkpoint_every=0, kl_weight=1.0, ce_weight=0.5)
    return HealConfig(**{**base, **kw})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_loss_and_gradients_equal_the_full_logits(monkeypatch, temperature):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 7 * 50)  # 7 rows of a 50-token vocabulary: 6 chunks, the last short
    g = torch.Generator().manual_seed(0)
    b, length, d, vocab = 2, 20, 16, 50
    head, t_head = torch.nn.Linear(d, vocab, bias=True), torch.nn.Linear(d, vocab, bias=False)
    for p in (*head.parameters(), t_head.weight):
        p.data = torch.randn(p.shape, generator=g)
    hs = torch.randn(b, length, d, generator=g, requires_grad=True)
    ht = torch.randn(b, length, d, generator=g)
    x = torch.randint(0, vocab, (b, length), generator=g)
    cfg = HealConfig(kl_weight=2.0, ce_weight=1.0, temperature=temperature)
    ref = distill_loss(head(hs), t_head(ht), x, cfg)
    ref[0].backward()
    want = (hs.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hs.grad = head.weight.grad = head.bias.grad = None
    targets = torch.cat([x[:, 1:], torch.full((b, 1), -100)], 1).flatten()
    got = chunked.chunked_distill(hs.flatten(0, 1), head, ht.flatten(0, 1), t_head, targets, cfg)
    (3.0 * got[0]).backward()  # a scaled loss (gradient accumulation) scales every gradient
    for r, c in zip(ref, got, strict=True):
        torch.testing.assert_close(c, r.float(), rtol=1e-5, atol=1e-6)
    for w, have in zip(want, (hs.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(have, 3.0 * w, rtol=1e-4, atol=1e-6)
    assert ref[1] > 0.1  # the two heads really disagree


def _grads(models, x, fast: bool):
    student, teacher = load_model(models["moe"], device="cpu"), load_model(models["dense"], device="cpu")
    cfg = _cfg(models, mixed_precision="no")
    with straight_through_routing(student, True):
        if fast:
            with batched_experts(student) as n:
                assert n == 2
                loss = fast_distill_loss(student, student, teacher, x, cfg, lowp=False)[0]
        else:
            loss = distill_loss(student(input_ids=x).logits, teacher(input_ids=x).logits, x, cfg)[0]
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}


def test_batched_experts_give_the_reference_loss_and_every_gradient(models):
    x = models["held"][:2]
    ref_loss, ref = _grads(models, x, fast=False)
    loss, got = _grads(models, x, fast=True)
    assert ref.keys() == got.keys() and any(".router." in n for n in ref) and any(".experts.3." in n for n in ref)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref:
        assert float((got[name] - ref[name]).norm()) <= 1e-4 * float(ref[name].norm()) + 1e-8, name
    student = load_model(models["moe"], device="cpu")
    with batched_experts(student):
        pass
    assert not any(k in vars(student.model.layers[0].mlp) for k in ("route", "routed_sum", "routed_outputs"))  # restored


def test_fast_engine_heals_like_the_reference_and_bf16_holds(models):
    teacher = load_model(models["dense"], device="cpu")
    before = distill_metrics(load_model(models["moe"], device="cpu"), teacher, models["held"], 8)["kl"]
    runs = {}
    for name, kw in (("reference", {"engine": "reference", "mixed_precision": "no"}),
                     ("fast", {"engine": "fast", "mixed_precision": "no"}), ("bf16", {"engine": "fast", "mixed_precision": "bf16"})):
        student = load_model(models["moe"], device="cpu")
        metrics = heal(student, teacher, models["tok"], _cfg(models, tokens=SEQ * 4 * 16, ce_weight=0.0, **kw))
        runs[name] = (metrics, distill_metrics(student, teacher, models["held"], 8)["kl"])
    ref_hist, fast_hist = runs["reference"][0]["history"], runs["fast"][0]["history"]
    assert [h["loss"] for h in fast_hist] == pytest.approx([h["loss"] for h in ref_hist], rel=1e-3)
    drop = before - runs["reference"][1]
    assert drop > 0.3 * before  # the heal really heals
    assert abs(runs["fast"][1] - runs["reference"][1]) < 0.02 * drop
    assert runs["bf16"][0]["mixed_precision"] == "bf16" and abs(runs["bf16"][1] - runs["reference"][1]) < 0.1 * drop


def test_epochs_reuse_the_distinct_windows_and_too_short_text_is_one_line(models):
    tok = models["tok"]
    cfg = _cfg(models, tokens=SEQ * 4 * 6, epochs=3)  # 24 windows trained, 8 distinct
    text = TextSource("train", [models["train"].read_text()])
    order = training_windows(tok, text, cfg)
    distinct = {tuple(w.tolist()) for w in order}
    assert order.shape == (24, SEQ) and cfg.distinct_windows() == len(distinct) == 8
    assert all({tuple(w.tolist()) for w in order[8 * e : 8 * (e + 1)]} == distinct for e in range(3))  # each epoch sees all
    assert not torch.equal(order[:8], order[8:16])  # reshuffled per epoch
    one = training_windows(tok, text, _cfg(models, tokens=SEQ * 4 * 6))
    assert torch.equal(one, training_windows(tok, text, _cfg(models, tokens=SEQ * 4 * 6, epochs=1)))
    short = TextSource("short", ["the of and to " * 10])  # 140 tokens
    with pytest.raises(DataError, match=r"heal \(3 epochs x 8 windows\) text 'short' has 140 tokens but 256 are needed") as err:
        training_windows(tok, short, cfg)
    assert "\n" not in str(err.value) and "raise epochs" in str(err.value)


def test_wsd_schedule_is_flat_then_decays_to_the_floor(models):
    cfg = _cfg(models, schedule="wsd", warmup=0.1, decay=0.3, min_lr_ratio=0.1)
    f = [lr_factor(s, 20, cfg) for s in range(20)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2:14] == [1.0] * 12  # 2 warm-up steps, flat until the last 6
    assert all(a > b for a, b in zip(f[13:], f[14:], strict=False)) and f[-1] == pytest.approx(0.1)


def test_cli_eval_every_writes_the_heldout_curve_and_its_plot(models, tmp_path):
    out = tmp_path / "healed"
    args = ["heal", str(models["moe"]), str(out), "--teacher", str(models["dense"]), "--heal-tokens", str(SEQ * 4 * 4),
            "--heal-source", str(models["train"]), "--seqlen", str(SEQ), "--batch", "4", "--lr", "3e-3", "--device", "cpu",
            "--epochs", "2", "--eval-every", "2", "--eval-tokens", str(SEQ * 4), "--eval-source", str(models["train"]), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    curve = json.loads((out / "heal.json").read_text())["heldout"]
    assert [p["step"] for p in curve] == [0, 2, 4] and all(math.isfinite(p["ppl"]) for p in curve)
    # The points are the held-out KL of the student at that step: the first and last match an independent measurement.
    held = tokenize_windows(models["tok"], load_text(str(models["train"])), SEQ * 4, SEQ)
    dense = load_model(models["dense"], device="cpu")
    for point, folder in ((curve[0], models["moe"]), (curve[-1], out)):
        want = distill_metrics(load_model(folder, device="cpu"), dense, held)
        assert point["kl"] == pytest.approx(want["kl"], rel=0.05) and point["ppl"] == pytest.approx(want["ppl"], rel=0.02)
    assert abs(curve[-1]["kl"] - curve[0]["kl"]) > 0.05 * curve[0]["kl"]
    assert json.loads(result.stdout)["heldout"] == curve
    assert (out / "heal-kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epochs_cache_the_teacher_and_a_resume_in_the_second_epoch_is_exact(models, tmp_path, monkeypatch):
    teacher = load_model(models["dense"], device="cpu")
    cfg = _cfg(models, tokens=SEQ * 4 * 6, epochs=2, checkpoint_every=2)  # 12 distinct windows, steps 4-6 repeat them
    calls = []
    real_cache = heal_train.TeacherCache

    class Counting(real_cache):
        def __call__(self, x):
            before = len(self.states)
            out = super().__call__(x)
            calls.append(len(self.states) - before)
            return out

    monkeypatch.setattr(heal_train, "TeacherCache", Counting)
    reference = load_model(models["moe"], device="cpu")
    ref_metrics = heal(reference, teacher, models["tok"], cfg, tmp_path / "a")
    assert sum(calls) == 12 and calls[6:] == [0] * 6  # the second epoch runs no teacher forward

    class Stop(Exception):
        pass

    def stop_at_5(event):
        if event.stage == "step" and event.step == 5:
            raise Stop

    with pytest.raises(Stop):
        heal(load_model(models["moe"], device="cpu"), teacher, models["tok"], cfg, tmp_path / "b", stop_at_5)
    resumed = load_model(models["moe"], device="cpu")
    metrics = heal(resumed, teacher, models["tok"], cfg, tmp_path / "b")  # resumes at step 4 with an empty cache
    assert metrics["resumed_from_step"] == 4
    assert [h["loss"] for h in metrics["history"]] == [h["loss"] for h in ref_metrics["history"]]
    ref_state = reference.state_dict()
    assert all(torch.equal(ref_state[n], t) for n, t in resumed.state_dict().items())


def test_a_family_that_scales_its_logits_heals_on_the_full_logits(tmp_path):
    """granite divides its logits by logits_scaling after the head: the chunked loss would ignore that, so the fast
    engine falls back to the full-logit objective there and heals exactly like the reference."""
    teacher_dir, student_dir = build_dense("granite", tmp_path / "t", seed=0), build_dense("granite", tmp_path / "s", seed=1)
    x = torch.randint(1, 96, (8 * 4, SEQ), generator=torch.Generator().manual_seed(0))
    cfg = HealConfig(tokens=SEQ * 4 * 8, seqlen=SEQ, batch=4, micro_batch=2, lr=1e-3, checkpoint_every=0, mixed_precision="no")
    runs = [heal(load_model(student_dir, device="cpu"), load_model(teacher_dir, device="cpu"), None,
                 cfg.model_copy(update={"engine": engine}), windows=x) for engine in ("reference", "fast")]
    assert [h["loss"] for h in runs[1]["history"]] == pytest.approx([h["loss"] for h in runs[0]["history"]], rel=1e-5)
    assert runs[0]["history"][-1]["kl"] < runs[0]["history"][0]["kl"]


def test_eval_every_without_eval_tokens_is_one_line(models, tmp_path):
    result = CliRunner().invoke(app, ["heal", str(models["moe"]), str(tmp_path / "x"), "--teacher", str(models["dense"]),
                                      "--eval-every", "2"])
    assert result.exit_code == 2 and "eval_every needs eval_tokens" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_distill_metrics_chunked_equal_the_full_logits(models, monkeypatch):
    student, teacher = load_model(models["moe"], device="cpu"), load_model(models["dense"], device="cpu")
    chunked_metrics = distill_metrics(student, teacher, models["held"][:4], 2)
    monkeypatch.setattr(objective, "plain_head", lambda model, x: False)  # force the [B, L, V] path
    full = distill_metrics(student, teacher, models["held"][:4], 2)
    assert chunked_metrics["tokens"] == full["tokens"] == 4 * SEQ and full["kl"] > 0.05
    for key in ("kl", "ppl", "teacher_ppl"):
        assert chunked_metrics[key] == pytest.approx(full[key], rel=1e-5), key


def test_auto_precision_is_bf16_only_where_onednn_has_native_bf16(monkeypatch):
    fast, reference = HealConfig(), HealConfig(engine="reference")
    assert mixed_precision(fast, cpu=False) == "bf16" and mixed_precision(HealConfig(mixed_precision="no"), cpu=False) == "no"
    assert mixed_precision(reference, cpu=True) == "no"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # forcing the AVX2 path: oneDNN would emulate bf16, slower than float32
    assert mixed_precision(fast, cpu=True) == "no"
    assert mixed_precision(HealConfig(mixed_precision="bf16"), cpu=True) == "bf16"  # asked for: kept
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert mixed_precision(fast, cpu=True) == ("bf16" if native else "no")
