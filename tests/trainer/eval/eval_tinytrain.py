"""Test helper: teach a tiny model the answers of a synthetic benchmark with a few hundred plain-torch steps.

"A model trained on the task scores higher than the untrained one" needs a trained model in well under two
minutes on 2 cores: the tiny model memorises (prompt -> answer) pairs rendered with its own chat template,
loss on the answer tokens only.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def train_on_answers(model_dir: Path, out_dir: Path, pairs: list[tuple[list[dict], str]], *, steps: int = 300,
                     lr: float = 3e-3, seed: int = 0) -> tuple[Path, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for conversation, answer in pairs:
        prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out_dir / name)
    return out_dir, float(loss.detach())
