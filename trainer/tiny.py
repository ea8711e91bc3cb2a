"""Tiny models built locally (no hub): for tests, benches, examples and the CPU quickstart. The one place
that writes them: loadable Qwen2 folders with a tokenizer (``build_tiny_model``), raw weight folders of any
layout for the Merge engine (``write_model``), and "fine-tuned" variants of either (``perturbed``,
``fine_tuned_copy``).

The tokenizer is a byte-level BPE trained here with exactly Qwen2's normalizer and pre-tokenizer, because
transformers 5.x reloads a ``model_type: qwen2`` tokenizer as its own Qwen2Tokenizer and rebuilds those parts
from code: any other pre-tokenizer would give different ids after a reload. The chat template is ChatML, like
the R1-Distill-Qwen students. Attention head_dim is hidden_size / num_heads and must be >= 32 for vLLM-CPU.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>"]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML; a default system prompt when none is given (as Qwen does); generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def default_corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """Text covering what the tests and the quickstart write: numbers, arithmetic, code, prose, markup."""
    rng = random.Random(seed)
    words = ("the answer is step first then so we add subtract multiply divide result total each sum value "
             "question choose option correct because therefore reason think final def return print input int "
             "for in range if else while list len str split map lambda import self true false none and or not "
             "which what how many compute number of apples boxes solve write function program test case").split()
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        kind = rng.random()
        if kind < 0.3:
            out.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. \\boxed{{{a - b}}}")
        elif kind < 0.55:
            out.append(f"def f(x):\n    return x * {a} + {b}\nprint(f(int(input())))\n")
        elif kind < 0.75:
            out.append(f"Answer: ({rng.choice('ABCD')}) A) {a} B) {b} C) {a + b} D) {abs(a - b)}")
        else:
            out.append(" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", "?", "!", ":"]))
    return out


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """A Qwen2-compatible fast tokenizer trained on ``corpus``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    fast.add_tokens(ADDED_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int | None = None, intermediate_size: int = 256, vocab_size: int = 512,
                     corpus: Iterable[str] | None = None, seed: int = 0, dtype: str = "float32",
                     tie_word_embeddings: bool = False, max_position_embeddings: int = 4096,
                     tokenizer=None) -> Path:
    """Write a loadable Hugging Face model folder (Qwen2ForCausalLM + tokenizer + chat template)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size // num_heads < 32:
        raise ValueError("vLLM-CPU needs head_dim = hidden_size / num_heads >= 32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or build_tokenizer(corpus, vocab_size)
    torch.manual_seed(seed)
    rows = -(-len(tokenizer) // 64) * 64  # real checkpoints pad the embedding rows
    config = Qwen2Config(
        vocab_size=rows, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, torch_dtype=dtype,
    )
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.6, top_p=0.95)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _mark_as_qwen2(out)
    return out


def _mark_as_qwen2(folder: Path) -> None:
    """Say the tokenizer is Qwen2's, as real Qwen checkpoints do (transformers then rebuilds it from code)."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(cfg, indent=2))


# ---- raw weight folders ----------------------------------------------------------------------------------
# What the Merge engine reads: named tensors in safetensors files plus a config.json, with no model class
# behind them. Tests and benches shape these freely (toy layouts, sharding, trimmed vocabularies) and make
# "fine-tuned" variants as a base plus a small seeded delta.

def random_tensors(shapes: dict, seed: int, scale: float = 1.0, dtype=None) -> dict:
    """Normal(0, ``scale``) tensors of ``shapes`` (name -> shape), drawn in ``shapes``' order from ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * scale).to(dtype or torch.float32) for n, s in shapes.items()}


def perturbed(tensors: dict, seed: int, scale: float = 0.1) -> dict:
    """``tensors`` plus a seeded Normal(0, ``scale``) delta, in their own dtypes: a stand-in fine-tune."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + torch.randn(t.shape, generator=g) * scale).to(t.dtype) for n, t in tensors.items()}


def write_model(folder: str | Path, tensors, *, shards: int = 1, shard_bytes: int | None = None,
                config: dict | None = None, extra_files: dict | None = None) -> Path:
    """A Hugging Face-style weight folder: config.json and one safetensors file, or shards with an index.

    ``tensors`` is a dict, or an iterable of (name, tensor) pairs consumed one at a time when ``shard_bytes``
    is set (a shard closes once it holds that many bytes: a model larger than memory can be written). Without
    ``shard_bytes`` the tensors are split into ``shards`` files of equal count. config.json says what a loader
    checks (vocabulary rows, tied or not, dtype); ``config`` adds to it or overrides it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    if shard_bytes is None:
        items = list(items)
        per = max(1, -(-len(items) // shards))
        groups = [dict(items[i:i + per]) for i in range(0, len(items), per)] or [{}]
    else:
        groups = _by_size(items, shard_bytes)
    weight_map, total, written = {}, 0, []
    seen = {"model.embed_tokens.weight": None, "lm_head.weight": None, "dtype": None}
    for i, group in enumerate(groups):
        path = folder / f"model-{i + 1:05d}.safetensors"
        save_file({n: t.contiguous() for n, t in group.items()}, path, metadata={"format": "pt"})
        written.append(path)
        for name, t in group.items():
            weight_map[name] = path.name
            total += t.numel() * t.element_size()
            seen["dtype"] = seen["dtype"] or str(t.dtype).removeprefix("torch.")
            if name in seen:
                seen[name] = t.shape
    if len(written) == 1:
        written[0].rename(folder / "model.safetensors")
    else:  # the count is known only now: give the shards the usual "-of-N" names
        renames = {p.name: f"{p.stem}-of-{len(written):05d}.safetensors" for p in written}
        for p in written:
            p.rename(folder / renames[p.name])
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": {n: renames[f] for n, f in weight_map.items()}}))
    cfg = {"model_type": "toy", "dtype": seen["dtype"] or "float32"}
    if seen["model.embed_tokens.weight"] is not None:
        cfg |= {"vocab_size": seen["model.embed_tokens.weight"][0],
                "tie_word_embeddings": seen["lm_head.weight"] is None}
    (folder / "config.json").write_text(json.dumps(cfg | (config or {})))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return folder


def _by_size(items, shard_bytes: int):
    group, size = {}, 0
    for name, t in items:
        group[name] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            yield group
            group, size = {}, 0
    if group:
        yield group


def fine_tuned_copy(model: str | Path, dest: str | Path, seed: int, scale: float = 0.01) -> Path:
    """A copy of the model folder ``model`` whose weights moved as fine-tuning would move them: every tensor
    plus a seeded Normal(0, ``scale``) delta (one generator over the shards in name order). The copy keeps the
    config and tokenizer; the original's publish manifest is dropped, as it lists the original's digests."""
    import shutil

    from safetensors.torch import load_file, save_file

    dest = Path(dest)
    shutil.copytree(model, dest)
    (dest / "_manifest.json").unlink(missing_ok=True)
    files = sorted(dest.glob("*.safetensors"))
    weights = {f: load_file(f) for f in files}
    moved = perturbed({(f, n): t for f, ts in weights.items() for n, t in ts.items()}, seed, scale)
    for f, ts in weights.items():
        save_file({n: moved[(f, n)].contiguous() for n in ts}, f, metadata={"format": "pt"})
    return dest
