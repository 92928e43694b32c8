"""quantize: round trips (load_model and standalone trust_remote_code) of dense and MoE sources, GPTQ vs RTN,
MoE-aware Hessians, provenance, resume after SIGKILL, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import build_dense, remote_code_logits, sample_text, save_char_tokenizer
from moeconv.config import QuantSpec, load_quant_recipe, load_recipe
from moeconv.convert import convert
from moeconv.errors import CheckpointError, DataError, RecipeError
from moeconv.io.load import load_model
from moeconv.modeling.hf.quant_linear import SUB1_DICTIONARY_KEY, SUB1_PAIR_COUNTS_KEY, QuantLinear, log8_levels
from moeconv.quant import pipeline, sub1
from moeconv.quant.grids import dequantize, find_params, quantize_rtn
from moeconv.quant.packing import unpack
from moeconv.quantize import quantize


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Tiny dense llama and gpt2 (Conv1D linears), a tiny MoE conversion of the llama, and calibration text."""
    root = tmp_path_factory.mktemp("quant-src")
    out = {"llama": build_dense("llama", root / "llama", intermediate_size=64), "gpt2": build_dense("gpt2", root / "gpt2")}
    for folder in out.values():
        save_char_tokenizer(folder)
    out["text"] = root / "calib.txt"
    out["text"].write_text(sample_text())
    out["moe"] = root / "moe"
    convert(str(out["llama"]), out["moe"], load_recipe(None, {"experts": 4, "top_k": 2, "train_router": False, "partition.method": "random"}).model_copy(update={"refit": None}))
    return out


def _recipe(sources, **overrides):
    base = {"group_size": 8, "calibration.source": str(sources["text"]), "calibration.tokens": 1024, "calibration.seqlen": 64,
            "batch_size": 4}
    return load_quant_recipe(None, {**base, **overrides})


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(3))


def _reference(src: Path, out: Path) -> torch.nn.Module:
    """The source model with every quantized weight replaced by the dequantized checkpoint buffers."""
    model = load_model(src, device="cpu", attn_implementation="eager")
    config = json.loads((out / "config.json").read_text())
    quant = config["moe"]["quant"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    table = None
    if quant["sub1_dictionary"]:
        with safe_open(str(out / index[quant["sub1_dictionary"]]), framework="pt") as h:
            table = h.get_tensor(quant["sub1_dictionary"])
        if quant["sub1_dictionary"] == SUB1_PAIR_COUNTS_KEY:  # stored as its pair counts: rebuild the table
            table = sub1.build_dictionary(table).table
    for name, fmt in quant["modules"].items():
        buffers = {}
        for key in [k for k in index if k.startswith(name + ".") and k.count(".") == name.count(".") + 1 and not k.endswith(".bias")]:
            with safe_open(str(out / index[key]), framework="pt") as h:
                buffers[key[len(name) + 1 :]] = h.get_tensor(key)
        if fmt["format"] == "sub1":
            buffers["dictionary"] = table
        w = dequantize(unpack(buffers, fmt))  # [out, in]
        module = model.get_submodule(name)
        module.weight.data = w.t().contiguous() if type(module).__name__ == "Conv1D" else w
    return model.eval()


def _logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits


@pytest.mark.parametrize(("source", "bits"), [("llama", "4"), ("gpt2", "3"), ("moe", "sub1"), ("moe", "2")])
def test_round_trip_load_model_and_standalone(sources, tmp_path, source, bits):
    out = tmp_path / "q"
    provenance = quantize(str(sources[source]), out, _recipe(sources, bits=bits))
    expected = _logits(_reference(sources[source], out))
    loaded = load_model(out, device="cpu", attn_implementation="eager")
    assert type(loaded).__name__ == "MoeconvForCausalLM"
    assert torch.allclose(_logits(loaded), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, _logits(load_model(sources[source], device="cpu", attn_implementation="eager")))

    (standalone,) = remote_code_logits([(out, _ids().tolist(), tmp_path / "standalone.pt")], tmp_path)
    assert torch.allclose(standalone, expected, atol=1e-5, rtol=1e-5)

    quant = json.loads((out / "config.json").read_text())["moe"]["quant"]
    assert quant["default"]["format"] == (bits if bits in ("ternary", "sub1") else f"int{bits}")
    assert all(".router" not in n and "norm" not in n for n in quant["modules"])
    bits_info = provenance["bits"]["quantized_linears"]
    per_tensor = [t for layer in provenance["layers"].values() for t in layer["tensors"].values()]
    assert len(per_tensor) == len(quant["modules"]) and bits_info["weights"] == sum(t["weights"] for t in per_tensor)
    if bits == "sub1":
        with safe_open(str(out / "model-00001-of-00001.safetensors"), framework="pt") as h:
            keys = list(h.keys())
        assert keys.count(SUB1_PAIR_COUNTS_KEY) == 1 and SUB1_DICTIONARY_KEY not in keys
        assert not any(k.endswith(".dictionary") for k in keys)
        assert provenance["quantization"]["sub1_dictionary_bits"] == 9 * 64  # the counts, not the 2^16-entry table
        assert all(t["format"]["lo_hi"] == "log8" for t in per_tensor)
    else:  # intN: codes + an fp16 scale and a packed zero point per group of 8 (int3 pads rows to 8-value chunks)
        assert all(int(bits) + 2 + int(bits) / 8 <= t["bits_per_weight"] <= int(bits) + 2 + 1.5 for t in per_tensor)


def _stacks(names: list[str]) -> list[list[str]]:
    """Modules quantized as one GPTQ problem (same input: q/k/v; each expert's gate/up), in stacking order."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        parent, leaf = name.rsplit(".", 1)
        stage = {"k_proj": "qkv", "v_proj": "qkv", "q_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}.get(leaf, leaf)
        groups.setdefault((parent, stage), []).append(name)
    order = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    return [sorted(g, key=lambda n: order.index(n.rsplit(".", 1)[1]) if n.rsplit(".", 1)[1] in order else 0) for g in groups.values()]


def test_sub1_weights_are_the_log8_levels_gptq_used(sources, tmp_path):
    recipe = _recipe(sources, bits="sub1")
    quantize(str(sources["moe"]), tmp_path / "s", recipe)
    quantize(str(sources["moe"]), tmp_path / "t", _recipe(sources, bits="ternary"))
    src = load_model(sources["moe"], device="cpu", attn_implementation="eager")
    sub, ter = (load_model(tmp_path / d, device="cpu", attn_implementation="eager") for d in ("s", "t"))
    names = [n for n, m in sub.named_modules() if isinstance(m, QuantLinear)]
    assert names and all(sub.get_submodule(n).fmt["lo_hi"] == "log8" for n in names)
    stacks = _stacks(names)
    assert any(len(g) == 3 for g in stacks) and any(len(g) == 2 for g in stacks)
    for group in stacks:
        # GPTQ takes a per-row grid from the stacked weights up front: find_params on them gives the levels it used
        w = torch.cat([src.get_submodule(n).weight.detach().float() for n in group])  # [Σout, in]
        lo, hi = find_params(w[:, None, :], QuantSpec("sub1"))  # [Σout, 1]
        row = 0
        for name in group:
            module, ternary = sub.get_submodule(name), ter.get_submodule(name)
            weight = module.dequantize_weight()  # [out, in]
            rows = weight.shape[0]
            lo_hi = torch.cat([lo[row : row + rows], hi[row : row + rows]], dim=1)  # [out, 2]
            row += rows
            smallest, largest = module.lo_hi_range.tolist()
            levels = log8_levels(smallest, largest)
            assert torch.equal(levels[module.lo_hi_codes.long()] * torch.tensor([-1.0, 1.0]) + 0.0, lo_hi), name
            # every weight is its row's lo, 0 or hi, and sub1 decodes to exactly the plain ternary checkpoint
            on_grid = (weight == 0) | (weight == lo_hi[:, :1]) | (weight == lo_hi[:, 1:])
            assert bool(on_grid.all()) and bool((weight != 0).any()), name
            assert torch.equal(weight, ternary.dequantize_weight()), name
    assert sub.quant.table().numel() == sub.get_submodule(names[0]).fmt["dictionary_size"]


@pytest.mark.parametrize("float_zeros", [False, True])
def test_rtn_matches_tensor_level_rtn(sources, tmp_path, float_zeros):
    out = tmp_path / "rtn"
    quantize(str(sources["llama"]), out, _recipe(sources, bits="4", method="rtn", float_zeros=float_zeros))
    dense = AutoModelForCausalLM.from_pretrained(sources["llama"], dtype=torch.float32)
    model = _reference(sources["llama"], out)
    quant = json.loads((out / "config.json").read_text())["moe"]["quant"]
    assert quant["default"]["float_zeros"] == float_zeros
    for name in quant["modules"]:
        w = dense.get_submodule(name).weight.detach()
        expected = dequantize(quantize_rtn(w, QuantSpec(4, 8, float_zeros=float_zeros)))
        assert torch.equal(model.get_submodule(name).weight, expected), name


def test_gptq_beats_rtn_end_to_end(sources, tmp_path):
    """Held-out logits of the layer-sequential GPTQ model are closer to the source model's than RTN's, at 4 and 3 bits."""
    held_out = sample_text(chars=400, seed=11)[:256]  # same kind of text as the calibration, unseen
    ids = torch.tensor([ord(c) - 31 for c in held_out]).view(4, 64)  # the char tokenizer of conftest
    ref = _logits(load_model(sources["llama"], device="cpu", attn_implementation="eager"), ids)
    for bits in ("4", "3"):
        errors = {}
        for method in ("gptq", "rtn"):
            out = tmp_path / f"{bits}-{method}"
            recipe = _recipe(sources, bits=bits, method=method, group_size=-1, **{"calibration.tokens": 4096})
            quantize(str(sources["llama"]), out, recipe)
            errors[method] = ((_logits(load_model(out, device="cpu", attn_implementation="eager"), ids) - ref).norm() / ref.norm()).item()
        assert errors["gptq"] < errors["rtn"], (bits, errors)


def test_moe_expert_hessians_and_sparse_experts(sources, tmp_path):
    prov = quantize(str(sources["moe"]), tmp_path / "a", _recipe(sources, bits="4"))
    layer = prov["layers"]["0"]
    counts = layer["expert_tokens"]["mlp.experts.*.up_proj"]  # an expert calls up_proj first
    assert len(counts) == 4 and sum(counts) == 1024 * 2  # every (token, selected expert) pair, top-2
    assert layer["expert_tokens"]["mlp.experts.*.down_proj"] == counts
    assert layer["tensors"]["model.layers.0.mlp.experts.1.up_proj"]["tokens"] == counts[1]
    assert layer["low_token_experts"] == []

    pooled = quantize(str(sources["moe"]), tmp_path / "b", _recipe(sources, bits="4", min_expert_tokens=10**6))
    rtn = quantize(str(sources["moe"]), tmp_path / "c", _recipe(sources, bits="4", min_expert_tokens=10**6, sparse_experts="rtn"))
    for prov, method in ((pooled, "gptq (pooled hessian)"), (rtn, "rtn (too few tokens)")):
        assert prov["layers"]["1"]["low_token_experts"] == [0, 1, 2, 3]
        assert prov["layers"]["1"]["tensors"]["model.layers.1.mlp.experts.2.down_proj"]["method"] == method
        assert prov["layers"]["1"]["tensors"]["model.layers.1.self_attn.q_proj"]["method"] == "gptq"


def test_experts_split_into_gptq_calls_give_the_same_result(sources, tmp_path, monkeypatch):
    """At 8B width the experts of a stage go one GPTQ call each (GPTQ_BATCH_BYTES); the split changes nothing but memory."""
    assert [list(c) for c in pipeline._chunks(8, 3584, 4096)] == [[e] for e in range(8)]  # 8B gate+up: ~0.8 GiB each
    assert [list(c) for c in pipeline._chunks(16, 192, 576)] == [list(range(16))]  # SmolLM2 (16,4): one call
    whole = quantize(str(sources["moe"]), tmp_path / "whole", _recipe(sources, bits="4"))
    monkeypatch.setattr(pipeline, "GPTQ_BATCH_BYTES", 1)
    split = quantize(str(sources["moe"]), tmp_path / "split", _recipe(sources, bits="4"))
    for i, layer in whole["layers"].items():
        for name, entry in layer["tensors"].items():
            assert split["layers"][i]["tensors"][name]["error"] == pytest.approx(entry["error"], rel=1e-4), name
    a, b = ({k: v for f in sorted((tmp_path / run).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
            for run in ("whole", "split"))
    codes = [k for k in a if ".experts." in k and k.endswith(".qweight")]
    assert codes and sum(not torch.equal(a[k], b[k]) for k in codes) <= len(codes) // 4  # float ties may flip a code


def test_dry_run_writes_nothing(sources, tmp_path):
    plan = quantize(str(sources["moe"]), tmp_path / "never", _recipe(sources, bits="3"), dry_run=True)
    assert plan.kind == "moe" and plan.format == "int3" and plan.layers == 2
    assert "model.layers.1.mlp.experts.3.down_proj" in plan.modules and not any("router" in n for n in plan.modules)
    assert 3 + 2 + 3 / 8 <= plan.bits_per_weight_estimate <= 3 + 2 + 1.5
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()


def test_bad_inputs_raise_one_line_errors(sources, tmp_path):
    with pytest.raises(RecipeError, match="unsupported width"):
        _recipe(sources, bits="5")
    with pytest.raises(RecipeError, match=r"group size 7 does not divide .*use one of 8, 16, 32 or -1"):
        quantize(str(sources["llama"]), tmp_path / "g", _recipe(sources, group_size=7))
    with pytest.raises(DataError, match=r"has \d+ tokens but 65536 are needed"):
        quantize(str(sources["llama"]), tmp_path / "t", _recipe(sources, **{"calibration.tokens": 65536}))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        quantize(str(sources["llama"]), tmp_path / "e", _recipe(sources, **{"calibration.source": str(empty)}))
    done = tmp_path / "done"
    quantize(str(sources["llama"]), done, _recipe(sources, method="rtn"))
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize(str(done), tmp_path / "again", _recipe(sources, method="rtn"))


def test_cli_errors_are_one_line(sources, tmp_path):
    cmd = [sys.executable, "-m", "moeconv.cli.app", "quantize", str(sources["llama"]), str(tmp_path / "x"), "--method", "rtn"]
    for extra, needle in ((["--bits", "5"], "unsupported width"), (["--bits", "4", "--group-size", "7"], "does not divide"),
                          (["--bits", "4", "--symmetric", "--float-zeros"], "symmetric grid has no zero points"),
                          (["--bits", "ternary", "--float-zeros"], "ternary grids have no zero points")):
        result = subprocess.run(cmd + extra, capture_output=True, text=True)
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = subprocess.run(cmd + ["--bits", "4", "--group-size", "8", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["bits"]["quantized_linears"]["bits_per_weight"] > 4


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    src = build_dense("llama", tmp_path / "dense", num_hidden_layers=6)
    save_char_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text())

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "moeconv.cli.app", "quantize", str(src), str(out), "--bits", "sub1", "--calib", str(text),
                "--calib-tokens", "512", "--seqlen", "64", "--max-shard-size", "1KB", "-q", *extra]

    subprocess.run(cmd(tmp_path / "reference"), check=True)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    proc = subprocess.Popen(cmd(out))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads((partial / "progress.json").read_text())["shards"]
        except (OSError, json.JSONDecodeError, KeyError):
            done = {}
        if len(done) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not out.exists() and partial.is_dir()
    subprocess.run(cmd(out, "--resume"), check=True)
    files = lambda folder: {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}  # noqa: E731
    assert files(out) == files(tmp_path / "reference")


class _Killed(Exception):
    pass


def test_resume_inside_the_sub1_reencode_is_byte_identical(sources, tmp_path, monkeypatch):
    """A run stopped after re-encoding its first shard resumes with that shard's formats rebuilt from the files."""
    import moeconv.quantize as quantize_module

    recipe = _recipe(sources, bits="sub1", max_shard_size="4KB")
    quantize(str(sources["llama"]), tmp_path / "reference", recipe)
    real = quantize_module._encode_sub1

    def stopped_after_one_shard(partial, names, metrics, progress):
        assert len(names) > 1, "the test needs several shards"
        write = partial.write_shard

        def write_then_stop(shard, tensors):
            write(shard, tensors)
            raise _Killed

        partial.write_shard = write_then_stop
        real(partial, names, metrics, progress)

    monkeypatch.setattr(quantize_module, "_encode_sub1", stopped_after_one_shard)
    with pytest.raises(_Killed):
        quantize(str(sources["llama"]), tmp_path / "out", recipe)
    monkeypatch.setattr(quantize_module, "_encode_sub1", real)
    quantize(str(sources["llama"]), tmp_path / "out", recipe, resume=True)
    files = lambda folder: {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}  # noqa: E731
    assert files(tmp_path / "out") == files(tmp_path / "reference")


class _Counted(torch.nn.Linear):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


class _TwoStep(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _Counted(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


def test_output_cache_replays_finished_modules_per_batch():
    from moeconv.quant.output_cache import OutputCache

    torch.manual_seed(0)
    layer = _TwoStep()
    batches = [torch.randn(3, 8) for _ in range(3)]
    expected = [layer(x) for x in batches]
    cache = OutputCache(layer, {"a": layer.a, "b": layer.b})
    cache.update({"a"})
    for _ in range(2):
        _Counted.calls = 0
        cache.new_pass()
        outputs = [layer(x) for x in batches]
        assert all(torch.equal(o, e) for o, e in zip(outputs, expected, strict=True))
    assert _Counted.calls == 0  # second pass: every batch replayed
    out = layer(batches[0])  # the in-place change of a replayed output must not reach the cache
    out.add_(1)
    cache.new_pass()
    assert torch.equal(layer(batches[0]), expected[0])
    cache.close()
    assert "forward" not in layer.a.__dict__ and not layer._forward_pre_hooks


def test_per_expert_modules_is_per_instance_and_exact():
    from moeconv.modeling.hf.moe_block import MoeconvMoeBlock
    from moeconv.quant.pipeline import per_expert_modules

    torch.manual_seed(1)
    moe = {"num_experts": 4, "top_k": 2, "expert_size": 6, "activation": "silu", "scoring": "softmax"}
    block, other = MoeconvMoeBlock(8, moe), MoeconvMoeBlock(8, moe)
    x = torch.randn(2, 5, 8)
    seen = []
    for e, expert in enumerate(block.experts):
        expert.up_proj.register_forward_pre_hook(lambda _m, _a, e=e: seen.append(e))
    with torch.no_grad():
        reference = block(x)
        seen.clear()
        with per_expert_modules(block):
            assert not block.use_fused_kernel and other.use_fused_kernel
            inside = block(x)
    assert sorted(set(seen)) == sorted(set(block.route(x.reshape(-1, 8))[0].flatten().tolist()))
    assert torch.allclose(inside, reference, atol=1e-6)
    assert block.use_fused_kernel


def test_inspect_counts_logical_weights_of_quantized_linears(sources, tmp_path):
    from moeconv.inspect import inspect_checkpoint

    out = tmp_path / "q"
    prov = quantize(str(sources["moe"]), out, _recipe(sources, bits="3", method="rtn"))
    before, after = inspect_checkpoint(sources["moe"]), inspect_checkpoint(out)
    assert after["parameters"] == before["parameters"] and after["active_parameters"] == before["active_parameters"]
    quant = after["quantization"]
    assert quant["formats"] == ["int3"] and quant["weights"] == prov["bits"]["quantized_linears"]["weights"]
    assert quant["bits_per_weight"] == pytest.approx(prov["bits"]["quantized_linears"]["bits_per_weight"])
