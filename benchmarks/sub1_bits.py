"""Where the bits of a sub1 checkpoint go: a per-tensor-kind table of zeros, entropies and stored bits per weight.

    python benchmarks/sub1_bits.py /path/to/sub1-checkpoint [--json out.json]

Per kind (expert gate/up/down, attention, other linears) and for all experts / all linears:
- zeros: fraction of ternary symbols that are 0;
- H sym: empirical entropy of the symbols {0, lo, hi} of the kind, bits per weight (i.i.d. symbols);
- H pair: empirical entropy of the pair letters of the kind / 2, bits per weight (i.i.d. letters);
- H row: mean over rows of the entropy of each row's own symbol frequencies (a row-adaptive lower bound);
- iid: code bits per weight of the model's dictionary on i.i.d. letters drawn with the kind's letter frequencies
  (64 seeded rows of 16,384 letters, so row ends hardly count): what the code would reach without the real
  symbols' structure or any row/block ends;
- lo/hi range: the largest ratio of a tensor's largest to smallest nonzero lo/hi magnitude (log8 layout), and
  log8 err the worst relative rounding error that range allows (half a log step: expm1(ln(range) / 508));
- codes / index / lo_hi: stored bits per weight of the code stream, of the offsets (every buffer that is not
  codes, lo/hi or a dictionary) and of lo/hi (bf16 `lo_hi`, or 8-bit `lo_hi_codes` plus the tensor's float32
  `lo_hi_range`); total = their sum; the shared dictionary (its 9 int64 pair counts, or the whole table in older
  checkpoints) is added only to the "all experts" and "all linears" rows (stored once, charged in full to each of
  those scopes, as provenance.json's `bits` does).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from moeconv.modeling.hf.quant_linear import SUB1_PAIR_COUNTS_KEY, decode_sub1, quant_modules
from moeconv.quant import sub1

KINDS = ("expert gate", "expert up", "expert down", "attention", "other")
LO_HI_BUFFERS = ("lo_hi", "lo_hi_codes", "lo_hi_range")


def kind_of(name: str) -> str:
    if ".experts." in name:
        for proj in ("gate", "up", "down"):
            if f"{proj}_proj" in name:
                return f"expert {proj}"
    return "attention" if ".self_attn." in name else "other"


def entropy(counts: torch.Tensor) -> float:
    """Bits per draw of the empirical distribution `counts` [..., K], summed over the leading dims' draws / draws."""
    p = counts.double() / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    h = -(p * torch.log2(p.clamp(min=1e-300))).sum(dim=-1)  # [...]
    return float((h * counts.sum(dim=-1)).sum() / counts.sum().clamp(min=1))


def iid_code_rate(table: torch.Tensor, letter_counts: torch.Tensor, seed: int = 0) -> float:
    """Code bits per weight of greedy parsing with `table` on i.i.d. letters drawn from `letter_counts` [9]."""
    g = torch.Generator().manual_seed(seed)
    letters = torch.multinomial(letter_counts.double(), 64 * 16384, replacement=True, generator=g).reshape(64, -1)
    symbols = torch.stack([letters % 3, letters // 3], dim=-1).reshape(64, -1).to(torch.uint8)  # [64, 2 * 16384]
    codes, _ = sub1.encode(symbols, sub1.Sub1Dictionary(table), block_rows=1)
    return 16 * codes.numel() / symbols.numel()


def load(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((path / "config.json").read_text())
    quant = (config.get("moe") or {}).get("quant") or config.get("quantization_config") or {}
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as h:
            for key in h.keys():
                tensors[key] = h.get_tensor(key)
    return quant, tensors


def measure(path: Path) -> dict:
    quant, tensors = load(path)
    modules = {n: f for n, f in quant_modules(quant).items() if f["format"] == "sub1"}
    dictionary_key = quant.get("sub1_dictionary") or "quant.sub1_dictionary"
    stored = tensors[dictionary_key]
    table = sub1.build_dictionary(stored).table if dictionary_key == SUB1_PAIR_COUNTS_KEY else stored
    acc = defaultdict(lambda: defaultdict(float))
    letters = defaultdict(lambda: torch.zeros(9, dtype=torch.int64))
    for name, fmt in modules.items():
        rows, cols = int(fmt["out_features"]), int(fmt["in_features"])
        buffers = {k.rsplit(".", 1)[1]: t for k, t in tensors.items() if k.rsplit(".", 1)[0] == name}
        symbols = decode_sub1(buffers["codes"], table, rows, cols + cols % 2)  # padded pairs kept for the letters
        kind = kind_of(name)
        real = symbols[:, :cols].long()
        row_counts = torch.stack([(real == s).sum(dim=1) for s in range(3)], dim=1)  # [rows, 3]
        pairs = symbols[:, 0::2].long() + 3 * symbols[:, 1::2].long()  # [rows, P]
        a = acc[kind]
        a["weights"] += rows * cols
        a["rows"] += rows
        a["tensors"] += 1
        for s in range(3):
            a[f"sym{s}"] += float(row_counts[:, s].sum())
        a["row_entropy_bits"] += entropy(row_counts) * rows * cols
        letters[kind] += torch.bincount(pairs.flatten(), minlength=9)
        if "lo_hi_range" in buffers and buffers["lo_hi_range"][0] > 0:
            smallest, largest = buffers["lo_hi_range"].tolist()
            a["range"] = max(a["range"], largest / smallest)
        for buf, t in buffers.items():
            bits = t.numel() * t.element_size() * 8
            slot = "codes" if buf == "codes" else "lo_hi" if buf in LO_HI_BUFFERS else None if buf == "dictionary" else "index"
            if slot:
                a[slot] += bits
    dictionary_bits = stored.numel() * stored.element_size() * 8
    out = {"dictionary_bits": dictionary_bits, "dictionary_entries": table.numel(), "kinds": {}}
    scopes = {k: [k] for k in KINDS if k in acc}
    scopes["all experts"] = [k for k in acc if k.startswith("expert")]
    scopes["all linears"] = list(acc)
    for scope, kinds in scopes.items():
        w = sum(acc[k]["weights"] for k in kinds)
        if not w:
            continue
        sym = torch.tensor([sum(acc[k][f"sym{s}"] for k in kinds) for s in range(3)])
        let = sum(letters[k] for k in kinds)
        n = sum(acc[k]["weights"] for k in kinds)
        row = {
            "tensors": int(sum(acc[k]["tensors"] for k in kinds)), "weights": int(w),
            "mean row length": w / sum(acc[k]["rows"] for k in kinds),
            "zeros": float(sym[0] / sym.sum()), "lo share": float(sym[1] / sym.sum()),
            "H sym": entropy(sym), "H pair": entropy(let) / 2,
            "H row": sum(acc[k]["row_entropy_bits"] for k in kinds) / n,
            "iid": iid_code_rate(table, let),
        }
        spread = max(acc[k]["range"] for k in kinds)
        if spread:
            row["lo/hi range"], row["log8 err"] = spread, math.expm1(math.log(spread) / 508)
        for slot in ("codes", "index", "lo_hi"):
            row[slot] = sum(acc[k][slot] for k in kinds) / w
        row["total"] = row["codes"] + row["index"] + row["lo_hi"]
        if scope.startswith("all"):
            row["dictionary"] = dictionary_bits / w
            row["total"] += row["dictionary"]
        out["kinds"][scope] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.checkpoint)
    cols = ["weights", "mean row length", "zeros", "lo share", "H sym", "H pair", "H row", "iid", "lo/hi range", "log8 err",
            "codes", "index", "lo_hi", "dictionary", "total"]
    print(f"dictionary: {result['dictionary_entries']} entries, {result['dictionary_bits']} bits stored")
    print("| kind | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for kind, row in result["kinds"].items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("–" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if not math.isnan(v) else "nan")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
