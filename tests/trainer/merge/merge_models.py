"""The toy tensor layout the Merge tests use, and Merge manifests over model folders (the folders are written
by branchmerge.trainer.tiny: random_tensors, perturbed, write_model)."""
from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import manifest

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
    return manifest("Merge", name, body)


def write_manifest(path: Path, manifest: dict) -> Path:
    Path(path).write_text(yaml.safe_dump(manifest, sort_keys=False))
    return Path(path)


def read_model(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(f)
    return out
