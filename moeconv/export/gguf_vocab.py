"""The tokenizer.* keys of a GGUF: copied from the source GGUF, or built from a byte-level BPE tokenizer.json."""

from __future__ import annotations

import json
from dataclasses import dataclass

from moeconv.export.registry import ExportError
from moeconv.export.source import ExportSource

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


@dataclass
class VocabKeys:
    """(key, value, GGUFValueType, array element type) entries, and where they came from."""

    entries: list[tuple]
    origin: str


def vocab_keys(src: ExportSource) -> VocabKeys:
    gguf_file = src.gguf_source()
    if gguf_file is not None:
        return _from_gguf(gguf_file)
    return _from_tokenizer_json(src)


def _from_gguf(path) -> VocabKeys:
    from gguf import GGUFReader, GGUFValueType  # gguf is optional (extra 'gguf'): needed only for GGUF export

    reader = GGUFReader(str(path))
    entries = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
        entries.append((key, field.contents(), vtype, sub))
    return VocabKeys(entries, f"copied from {path.name} ({len(entries)} tokenizer keys)")


def _special_id(token, vocab: dict[str, int]) -> int | None:
    content = token.get("content") if isinstance(token, dict) else token
    return vocab.get(content) if content else None


def _from_tokenizer_json(src: ExportSource) -> VocabKeys:
    from gguf import GGUFValueType as T  # gguf is optional (extra 'gguf'): needed only for GGUF export

    file = src.path / "tokenizer.json"
    if not file.is_file():
        raise ExportError(f"{src.path} has no tokenizer.json (and no GGUF source to copy a vocabulary from); llama.cpp "
                          "needs one: copy the source model's tokenizer into the checkpoint folder")
    data = json.loads(file.read_text())
    model = data.get("model", {})
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(data.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        kind = model.get("type", "unknown") + ("" if byte_level else ", not byte-level")
        raise ExportError(f"gguf carries a byte-level BPE tokenizer.json or a GGUF source's vocabulary, and {src.path}'s "
                          f"tokenizer is {kind}; export a checkpoint converted from a GGUF or a byte-level BPE model")
    size = int(src.base.vocab_size)
    vocab = dict(model["vocab"])
    added = data.get("added_tokens", [])
    vocab.update({a["content"]: a["id"] for a in added})
    if max(vocab.values()) >= size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_UNUSED] * size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, TOKEN_NORMAL
    for a in added:
        tokens[a["id"]], types[a["id"]] = a["content"], TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    entries = [("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", "default", T.STRING, None),
               ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING), ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
               ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
    config_file = src.path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    for role in ("bos", "eos", "unk", "pad"):
        token_id = _special_id(config.get(f"{role}_token"), vocab)
        if token_id is not None:
            entries.append((f"tokenizer.ggml.{role}_token_id", token_id, T.UINT32, None))
    if "add_bos_token" in config:
        entries.append(("tokenizer.ggml.add_bos_token", bool(config["add_bos_token"]), T.BOOL, None))
    template = config.get("chat_template")
    if template is None and (src.path / "chat_template.jinja").is_file():
        template = (src.path / "chat_template.jinja").read_text()
    if isinstance(template, str):
        entries.append(("tokenizer.chat_template", template, T.STRING, None))
    return VocabKeys(entries, f"built from tokenizer.json ({len(model['vocab'])} tokens, {len(merges)} merges, "
                              "pre-tokenizer 'default': llama.cpp's GPT-2 split)")
