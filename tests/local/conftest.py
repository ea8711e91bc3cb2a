"""Fixtures for the local control plane: small model folders the real Merge stage can merge in seconds,
and manifests over them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

SHAPES = {"model.embed_tokens.weight": (32, 16), "model.layers.0.mlp.up_proj.weight": (32, 16),
          "model.layers.0.input_layernorm.weight": (16,), "lm_head.weight": (32, 16)}


def write_model(folder: Path, seed: int, base: dict | None = None, shapes: dict | None = None) -> dict:
    """A safetensors model folder: random tensors, or ``base`` plus a small random task vector."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {n: (base[n] if base else 0) + torch.randn(s, generator=g) * (0.05 if base else 1.0)
               for n, s in (shapes or SHAPES).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": 32,
                                                    "tie_word_embeddings": False}))
    return tensors


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = write_model(root / "base", 0)
    write_model(root / "m1", 1, base)
    write_model(root / "m2", 2, base)
    return {name: root / name for name in ("base", "m1", "m2")}


def merge(name: str, method: str, models: list, base=None, **spec) -> dict:
    """A Merge manifest; a model is a Path (uri) or a name of an upstream Merge (from:)."""
    def ref(m):
        return {"uri": Path(m).resolve().as_uri()} if isinstance(m, Path) else {"from": {"kind": "Merge", "name": m}}

    body = {"method": method, "models": [ref(m) for m in models], **spec}
    if base is not None:
        body["base"] = ref(base)
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": name}, "spec": body}


def write_manifests(folder: Path, docs: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return folder


def diamond(models: dict[str, Path], soup_weight: float = 1.0) -> list[dict]:
    """soup and ta are independent; fused needs both (a diamond's lower half)."""
    soup = merge("soup", "linear", [models["m1"], models["m2"]])
    soup["spec"]["models"][1]["weight"] = soup_weight
    return [soup,
            merge("ta", "task_arithmetic", [models["m1"], models["m2"]], base=models["base"]),
            merge("fused", "arcee_fusion", ["soup", "ta"], base="soup")]
