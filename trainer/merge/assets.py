"""The non-weight files of the merged folder: config and generation config from the base, tokenizer files
and chat template from the base or ``tokenizerSource``. Weights, indexes and training leftovers are not copied."""
from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import torch

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                      "merges.txt", "chat_template*", "spiece.model", "sentencepiece*.model")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def copy_assets(out_dir: Path, config_source: Path, tokenizer_source: Path, *,
                vocab_size: int | None, out_dtype: torch.dtype | None) -> list[str]:
    copied = []
    for name in CONFIG_FILES:
        src = config_source / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    config_path = out_dir / "config.json"
    if config_path.exists() and (vocab_size is not None or out_dtype is not None):
        config = json.loads(config_path.read_text())
        if vocab_size is not None:
            config["vocab_size"] = vocab_size
        if out_dtype in DTYPE_NAMES:
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
            for key in keys:
                config[key] = DTYPE_NAMES[out_dtype]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for src in _matching(tokenizer_source, TOKENIZER_PATTERNS):
        shutil.copyfile(src, out_dir / src.name)
        copied.append(src.name)
    return copied
