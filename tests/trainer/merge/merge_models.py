"""Small random model folders written with the safetensors library, and Merge manifests over them."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

HIDDEN, VOCAB, LAYERS = 16, 40, 2


def layer_shapes(hidden: int = HIDDEN, vocab: int = VOCAB, layers: int = LAYERS, tied: bool = False) -> dict:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
                   p + "mlp.up_proj.weight": (2 * hidden, hidden), p + "input_layernorm.weight": (hidden,)}
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_tensors(shapes: dict, seed: int, scale: float = 1.0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * scale).to(dtype) for n, s in shapes.items()}


def perturbed(tensors: dict, seed: int, scale: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + torch.randn(t.shape, generator=g) * scale).to(t.dtype) for n, t in tensors.items()}


def write_model(folder: Path, tensors: dict, *, shards: int = 1, config: dict | None = None,
                extra_files: dict | None = None) -> Path:
    """A HF-style folder: config.json, one file or ``shards`` shards with an index, optional extra files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per:(i + 1) * per]
            filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n].contiguous() for n in part}, folder / filename, metadata={"format": "pt"})
            weight_map |= {n: filename for n in part}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    vocab = tensors.get("model.embed_tokens.weight")
    cfg = {"model_type": "toy", "vocab_size": vocab.shape[0] if vocab is not None else VOCAB,
           "tie_word_embeddings": "lm_head.weight" not in tensors, "dtype": "float32"} | (config or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return folder


def merge_manifest(name: str, method: str, out: Path, models: list, base: Path | None = None,
                   **spec) -> dict:
    """A Merge manifest; ``models`` are paths or (path, {per-model fields})."""
    entries = []
    for m in models:
        path, fields = (m if isinstance(m, tuple) else (m, {}))
        entries.append({"uri": Path(path).resolve().as_uri(), **fields})
    body = {"method": method, "models": entries, "output": {"uri": Path(out).resolve().as_uri()}, **spec}
    if base is not None:
        body["base"] = {"uri": Path(base).resolve().as_uri()}
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": name}, "spec": body}


def write_manifest(path: Path, manifest: dict) -> Path:
    Path(path).write_text(yaml.safe_dump(manifest, sort_keys=False))
    return Path(path)


def read_model(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(f)
    return out
