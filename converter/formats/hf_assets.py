"""The tokenizer files a Hugging Face folder takes from torchtitan's ``hf_assets_path``.

torchtitan trains with a tokenizer from that folder (``experiment.tokenizer_dir``) but never
writes one into its exports; a Hugging Face folder without it loads as a model, but not as a
pipeline. The files below are copied as they are when present (``config.json`` and the
safetensors index are not: the converter writes its own, from the checkpoint). The special
token ids that ``config.json`` and ``generation_config.json`` carry are read from the same
folder, and the tokenizer is checked against the model's vocabulary before any work.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converter.errors import ConversionError

# What transformers' and torchtitan's tokenizers read, and torchtune's llama3 tokenizer
# (original/tokenizer.model, as Meta's repositories keep it). Copied when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "original/tokenizer.model",
)
GENERATION_CONFIG = "generation_config.json"
# The assets' own config.json is not copied, but its special token ids are read.
_ASSETS_CONFIG = "config.json"
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

TokenIds = dict[str, int | list[int] | None]


def find_assets(folder: Path, vocab_size: int) -> dict[str, Path]:
    """The files of ``folder`` to copy into the output (name in the output -> file). Raises
    ConversionError, before any work, if the folder is missing, holds no tokenizer, or holds the
    tokenizer of a larger vocabulary than the model's."""
    setting = f"experiment.tokenizer_dir={folder}"
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file, not a folder"
        raise ConversionError(
            f"{setting} {what}. Point it at the folder of tokenizer files the run trained with "
            "(torchtitan's hf_assets_path), or leave it out (null) to write no tokenizer."
        )
    found = {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}
    if not found:
        held = sorted(p.name for p in folder.iterdir())[:12]
        raise ConversionError(
            f"{setting} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}; it holds "
            f"{held}). Point it at torchtitan's hf_assets_path, the folder the run's tokenizer "
            "was read from, or leave it out (null) to write no tokenizer."
        )
    if (folder / GENERATION_CONFIG).is_file():
        found[GENERATION_CONFIG] = folder / GENERATION_CONFIG
    highest, where = _highest_id(folder, found)
    if highest is not None and highest >= vocab_size:
        raise ConversionError(
            f"{setting}: its tokenizer has token ids up to {highest} ({where}), but the model's "
            f"embeddings have {vocab_size} rows: the tokenizer belongs to another model. Point "
            "experiment.tokenizer_dir at the hf_assets_path of the run that saved this checkpoint."
        )
    return found


def read_not_copied(folder: Path | None) -> dict[str, Path]:
    """The folder's own ``config.json``, whose token ids the output takes, if it has one."""
    path = folder / _ASSETS_CONFIG if folder else None
    return {_ASSETS_CONFIG: path} if path and path.is_file() else {}


def token_ids(folder: Path | None, files: Mapping[str, Path]) -> TokenIds:
    """The special token ids, each from the first of these that gives it: the assets'
    ``config.json``, their ``generation_config.json``, or the tokens named in
    ``tokenizer_config.json`` looked up in ``tokenizer.json``. None where none does.
    Remembered for the files as they are (a tokenizer.json may take a second to parse, and
    the checks, config.json and the manifest all ask)."""
    read = {**files, **{f"read {n}": p for n, p in read_not_copied(folder).items()}}
    seen = tuple((n, p, _identity(p)) for n, p in sorted(read.items()) if p.is_file())
    return dict(_token_ids(seen))


def _identity(path: Path) -> tuple[int, int, int]:
    """What tells a file's contents apart cheaply: an edit within one mtime tick changes
    the size or, written by a new file renamed over it, the inode."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


@functools.lru_cache(maxsize=8)
def _token_ids(seen: tuple[tuple[str, Path, tuple[int, int, int]], ...]) -> TokenIds:
    files = {name: path for name, path, _ in seen}
    ids: TokenIds = dict.fromkeys(TOKEN_KEYS)
    sources = [files[n] for n in (f"read {_ASSETS_CONFIG}", GENERATION_CONFIG) if n in files]
    for path in sources:
        if path.is_file():
            given = _json(path)
            for key in TOKEN_KEYS:
                if ids[key] is None and given.get(key) is not None:
                    ids[key] = given[key]
    if "tokenizer_config.json" in files and "tokenizer.json" in files:
        named = _json(files["tokenizer_config.json"])
        vocab = _vocabulary(_json(files["tokenizer.json"]))
        for key in TOKEN_KEYS:
            token = named.get(key.removesuffix("_id"))
            token = token.get("content") if isinstance(token, dict) else token
            if ids[key] is None and isinstance(token, str) and token in vocab:
                ids[key] = vocab[token]
    return ids


def generation_config(ids: TokenIds) -> str:
    """``generation_config.json`` as transformers writes it from a model's config, for a
    tokenizer folder that has none of its own."""
    config: dict[str, Any] = {"_from_model_config": True, **ids}
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _highest_id(folder: Path, files: Mapping[str, Path]) -> tuple[int | None, str]:
    """The highest token id the tokenizer files name, and where."""
    found: list[tuple[int, str]] = []
    if "tokenizer.json" in files:
        vocab = _vocabulary(_json(files["tokenizer.json"]))
        if vocab:
            found.append((max(vocab.values()), "tokenizer.json"))
    for key, value in token_ids(folder, files).items():
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int):
                found.append((i, key))
    return max(found) if found else (None, "")


def _vocabulary(tokenizer: dict[str, Any]) -> dict[str, int]:
    """Token -> id of a ``tokenizer.json``: its model's vocabulary (BPE, WordPiece) and its
    added tokens."""
    model = tokenizer.get("model") or {}
    vocab = dict(model["vocab"]) if isinstance(model.get("vocab"), dict) else {}
    for added in tokenizer.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    return vocab


def _json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(
            f"Cannot read {path} ({e}): the tokenizer folder's files must be JSON as Hugging "
            "Face writes them. Copy them again from the base model, or set "
            "experiment.tokenizer_dir to another folder."
        ) from e
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path} holds no JSON object; copy it again from the base model.")
    return loaded
