"""Fixtures for the local control plane: small model folders the real Merge stage can merge in seconds,
and manifests over them."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import manifest

SHAPES = {"model.embed_tokens.weight": (32, 16), "model.layers.0.mlp.up_proj.weight": (32, 16),
          "model.layers.0.input_layernorm.weight": (16,), "lm_head.weight": (32, 16)}


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """A random base and two "fine-tunes" of it (the base plus a small seeded task vector)."""
    from branchmerge.trainer.tiny import perturbed, random_tensors, write_model

    root = tmp_path_factory.mktemp("models")
    base = random_tensors(SHAPES, 0)
    write_model(root / "base", base)
    write_model(root / "m1", perturbed(base, 1, 0.05))
    write_model(root / "m2", perturbed(base, 2, 0.05))
    return {name: root / name for name in ("base", "m1", "m2")}


def merge(name: str, method: str, models: list, base=None, **spec) -> dict:
    """A Merge manifest; a model is a Path (uri) or a name of an upstream Merge (from:)."""
    def ref(m):
        return {"uri": Path(m).resolve().as_uri()} if isinstance(m, Path) else {"from": {"kind": "Merge", "name": m}}

    body = {"method": method, "models": [ref(m) for m in models], **spec}
    if base is not None:
        body["base"] = ref(base)
    return manifest("Merge", name, body)


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
