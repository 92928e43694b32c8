"""moeconv_C::moe_block, the whole MoE block at decode in one native call, against the per-expert loop (the reference)
and today's per-op fused path, on every CPU kernel path; and where MoeconvMoeBlock must not take it."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig

from moeconv.kernels import block as block_module
from moeconv.kernels import native
from moeconv.modeling.hf import moe_block
from moeconv.modeling.hf.configuration_moeconv import MoeconvConfig
from moeconv.modeling.hf.modeling_moeconv import MoeconvForCausalLM
from moeconv.modeling.hf.moe_block import MoeconvExpert, MoeconvMoeBlock, route

CPU_ISAS = native.available_cpu_isas()
pytestmark = pytest.mark.skipif(moe_block._fused_moe_block is None or not CPU_ISAS, reason="moeconv CPU kernels not built")
D = 20
BOUND = block_module.BLOCK_MAX_TOKENS
# fp32: the kernel tests' normwise 1e-5. bf16: every token within 3e-2 of the loop (which rounds after every op; the
# native paths keep fp32 sums), while a token with one wrong or lost expert is off by 0.1 or more.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _block(dtype=torch.float32, seed: int = 0, **moe) -> MoeconvMoeBlock:
    torch.manual_seed(seed)
    settings = dict(num_experts=6, top_k=2, expert_size=12, activation="silu", gated=True) | moe
    block = MoeconvMoeBlock(D, settings).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block.to(dtype)


class _Spy:
    """Counts moeconv_C::moe_block calls (block.py looks the op up on every call)."""

    def __init__(self, monkeypatch):
        self.calls, self.real = 0, torch.ops.moeconv_C.moe_block
        monkeypatch.setattr(torch.ops.moeconv_C, "moe_block", self)

    def __call__(self, *args):
        self.calls += 1
        return self.real(*args)


def _three_ways(block, x, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's output by the one native call, by today's per-op fused path, by the per-expert loop."""
    with torch.no_grad(), monkeypatch.context() as m:
        spy = _Spy(m)
        new = block(x)
        assert spy.calls == 1, "the block did not take moeconv_C::moe_block"
        m.setattr(moe_block, "_fused_moe_block", None)
        fused = block(x)
        m.setattr(moe_block, "_fused_moe_ffn", None)
        loop = block(x)
        assert spy.calls == 1
    return new, fused, loop


def _token_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().reshape(-1, D), want.double().reshape(-1, D)
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)).max().item()


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.dtype == torch.bfloat16:
        return _token_err(got, want)
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item() if torch.isfinite(got).all() else float("nan")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_block_matches_loop_and_fused_path(isa, dtype, monkeypatch):
    """Every scoring x renormalize, with and without a shared expert and down_bias, gated silu and gpt2-style
    (non-gated gelu with biases) experts, T = 1 up to the bound, 2-D and 3-D inputs."""
    experts = [dict(activation="silu", gated=True, ffn_bias=False), dict(activation="gelu_new", gated=False, ffn_bias=True),
               dict(activation="relu", gated=True, ffn_bias=True)]
    cases = itertools.product(["none", "softmax", "sigmoid"], [False, True], [0, 10], [False, True], experts)
    previous = native.set_cpu_isa(isa)
    try:
        for n, (scoring, renormalize, shared, down_bias, kind) in enumerate(cases):
            T = (1, 5, BOUND)[n % 3]
            block = _block(dtype, seed=n, scoring=scoring, renormalize=renormalize, shared_size=shared,
                           down_bias=down_bias, **kind)
            x = (torch.randn(T, D) if n % 2 else torch.randn(1, T, D)).to(dtype)
            new, fused, loop = _three_ways(block, x, monkeypatch)
            case = f"{isa} {dtype} {scoring} renormalize={renormalize} shared={shared} down_bias={down_bias} {kind} T={T}"
            assert new.shape == x.shape and new.dtype == dtype, case
            assert _err(new, loop) <= TOL[dtype], f"{case}: vs loop {_err(new, loop):.2e}"
            assert _err(new, fused) <= TOL[dtype], f"{case}: vs fused path {_err(new, fused):.2e}"
    finally:
        native.set_cpu_isa(previous)


def _stable_ids(block, x) -> torch.Tensor:
    """route()'s choice if ties went to the lower index (moeconv_C::route's stable order), not torch.topk's."""
    scores = block.router(x).float()
    scores = scores if block.scoring == "none" else (scores.softmax(-1) if block.scoring == "softmax" else scores.sigmoid())
    return torch.sort(scores.to(x.dtype), dim=-1, descending=True, stable=True).indices[:, : block.top_k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scoring", ["none", "softmax", "sigmoid"])
def test_ties_go_where_torch_topk_puts_them(scoring, dtype, monkeypatch):
    """Identical router rows tie exactly: the op must pick the experts route() (torch.topk) picks, which are not the
    lower-index ones that a stable sort would pick."""
    differs = 0
    for seed, k in itertools.product(range(4), (1, 2, 3)):
        block = _block(dtype, seed=seed, num_experts=8, top_k=k, scoring=scoring, renormalize=True)
        with torch.no_grad():
            rows = torch.randn(3, D)[torch.randint(0, 3, (8,))]  # 8 experts, 3 distinct rows
            block.router.weight.copy_(rows.to(dtype))
        x = torch.randn(BOUND, D).to(dtype)
        with torch.no_grad():
            ids = route(block.router(x), k, scoring, True)[0]
            differs += int(not torch.equal(ids.sort(-1).values, _stable_ids(block, x).sort(-1).values))
        new, _, loop = _three_ways(block, x, monkeypatch)
        assert _err(new, loop) <= TOL[dtype], f"seed {seed} k={k}: {_err(new, loop):.2e}"
    assert differs, "no case where torch.topk's tie order matters: the test would not catch a stable sort"


def test_greedy_generate_gives_the_same_tokens(monkeypatch):
    """A tiny converted model (shared expert, softmax + renormalize, down_bias): the same greedy tokens with the one
    native call per block as without it; decode steps take it, the longer prompt does not."""
    dense = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128)
    moe = dict(ffn_path="model.layers.{i}.mlp", layers=[0, 1], num_experts=4, top_k=2, expert_size=12, shared_size=16,
               scoring="softmax", renormalize=True, down_bias=True, activation="silu", gated=True)
    torch.manual_seed(0)
    model = MoeconvForCausalLM(MoeconvConfig(base_config=dense.to_dict(), moe=moe)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                torch.nn.init.normal_(p, std=0.3)
    prompt = torch.randint(0, 96, (1, BOUND + 4), generator=torch.Generator().manual_seed(1))
    generate = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with monkeypatch.context() as m:
        spy = _Spy(m)
        tokens = model.generate(prompt, **generate)
        assert spy.calls == 11 * 2, "every decode step of both blocks, and not the prefill, takes the native call"
        m.setattr(moe_block, "_fused_moe_block", None)
        without = model.generate(prompt, **generate)
        assert spy.calls == 22
    assert torch.equal(tokens, without)


def test_blocks_it_must_not_take(monkeypatch):
    """Training, a DAG aggregator, use_fused_kernel off, more tokens than the bound, a hooked router (routing
    statistics) or shared expert, a router in another dtype: today's path, same output as the loop."""
    block, x = _block(shared_size=10, scoring="softmax"), torch.randn(3, D)
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(moe_block, "_fused_moe_ffn", None)
        loop = block(x)
    spy = _Spy(monkeypatch)
    assert torch.allclose(block(x), loop, atol=1e-5)  # grad mode
    with torch.no_grad():
        block.use_fused_kernel = False
        assert torch.allclose(block(x), loop, atol=1e-5)
        block.use_fused_kernel = True
        block(torch.randn(BOUND + 1, D))
        seen = []
        for module in (block.router, block.shared.up_proj):
            handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.shape))
            assert torch.allclose(block(x), loop, atol=1e-5)
            handle.remove()
        assert len(seen) == 2, "the hooks must still fire"
        block.router.to(torch.float64)
        assert block_module.fused_moe_block(block, x) is None
        block.router.to(torch.float32)
        block.dag = lambda outputs, _x: outputs.sum(1)  # any aggregator: the per-slot path
        assert torch.allclose(block(x), loop, atol=1e-5)
        block.dag = None
    assert spy.calls == 0
    with torch.no_grad():
        assert torch.allclose(block(x), loop, atol=1e-5) and spy.calls == 1  # and it takes it again


def test_router_shared_and_bias_changes_reach_the_op(monkeypatch):
    """The router, shared expert and down_bias are read where they are: in-place edits, a replaced .data, a swapped
    module and load_state_dict(assign=True) all reach the next call."""
    block, x = _block(shared_size=10, down_bias=True, scoring="sigmoid"), torch.randn(4, D)
    before = _three_ways(block, x, monkeypatch)[0]

    def check(what: str) -> None:
        new, _, loop = _three_ways(block, x, monkeypatch)
        assert not torch.allclose(new, before), f"{what}: the output did not change"
        assert _err(new, loop) <= 1e-5, f"{what}: {_err(new, loop):.2e}"

    with torch.no_grad():
        block.router.weight.mul_(-1.0)
        check("router edited in place")
        block.router.weight.data = torch.randn(6, D)
        check("router .data replaced")
        block.down_bias.add_(1.0)
        check("down_bias edited in place")
    fresh = MoeconvExpert(D, 10, True, False, "silu")
    block.shared = fresh
    check("shared expert swapped")
    block.shared.up_proj = torch.nn.Linear(D, 10, bias=False)
    check("shared up_proj swapped")
    block.load_state_dict(_block(seed=5, shared_size=10, down_bias=True, scoring="sigmoid").state_dict(), assign=True)
    check("load_state_dict(assign=True)")
