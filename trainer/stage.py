"""``branchmerge stage <teachergen|sft|merge|eval> --spec FILE [--result FILE]`` -- the data plane's entry point.

The same entry runs in pods and under the local runner. It reads one resolved manifest (every ref a
``uri``), runs the stage module ``branchmerge.trainer.<stage>.stage`` (``run(ctx) -> metrics``), which
publishes its output atomically, and writes a result JSON: output URI, sha256 of each output file,
combined digest and metrics. Exit codes: 0 success, 2 invalid spec or input, 3 retryable failure.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..api.common import DatasetRef, ModelRef
from ..api.exit_codes import EXIT_OK, EXIT_RETRYABLE
from ..api.finite import finite
from ..api.graph import references
from ..api.outputs import combined_digest, read_manifest, write_json_atomic
from ..api.progress import URL_ENV as PROGRESS_URL_ENV
from ..api.resources import KIND_INFO, CustomResource
from ..api.uris import UnresolvableUri, local_path
from ..api.validation import InvalidManifest, parse_resource
from . import card as cards
from .card import CARD_KINDS
from .errors import InvalidInput, StageError
from .lineage import lineage_record
from .progress import Progress
from .publish import manifest_fields
from .staging import staged_sources

STAGES = {info.stage: kind for kind, info in KIND_INFO.items()}
TERMINATION_LOG_LIMIT = 4096  # bytes Kubernetes keeps of a termination message


@dataclass
class StageContext:
    resource: CustomResource
    output_uri: str
    output_dir: Path
    progress: Progress
    rank: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> Any:
        return self.resource.spec  # type: ignore[attr-defined]

    def input_path(self, ref: ModelRef | DatasetRef, what: str = "input") -> Path:
        """Local path of a resolved ref; InvalidInput if it does not exist."""
        if ref.uri is None:
            raise InvalidInput(f"{what}: unresolved from: reference (the control plane resolves refs)")
        try:
            path = local_path(ref.uri, ref.allow_patterns or ())
        except UnresolvableUri as err:
            raise InvalidInput(f"{what}: {err}") from None
        if not path.exists():
            raise InvalidInput(f"{what}: {ref.uri} does not exist ({path})")
        return path


def load_spec_file(path: str | Path) -> CustomResource:
    text = Path(path).read_text()
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) != 1:
        raise InvalidInput(f"{path}: expected exactly one manifest, found {len(docs)}")
    try:
        resource = parse_resource(docs[0])
    except InvalidManifest as err:
        raise InvalidInput(f"{path}: {err}") from None
    unresolved = references(resource)
    if unresolved:
        raise InvalidInput(f"{path}: {unresolved[0].path}: from: references must be resolved to a uri before "
                           f"a stage runs (got {unresolved[0].key})")
    return resource


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _flat_metrics(metrics: dict, prefix: str = "") -> dict:
    """Scalar metrics, nested ones as dotted keys (benchmarks.aime.pass1): the termination message is JSON
    the operator copies into status.metrics."""
    flat: dict = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float, str, bool)):
            flat[prefix + key] = value
        elif isinstance(value, dict) and prefix.count(".") < 2:
            flat.update(_flat_metrics(value, f"{prefix}{key}."))
    return flat


def _gpus_used() -> int:
    """CUDA devices visible to a stage that used CUDA (on Kubernetes: the pod's; under torchrun each rank sees
    all of them and holds one). A stage that never imported torch, or runs on CPU, used none. vLLM may touch
    CUDA only in its engine subprocess, so having it loaded with CUDA available counts as use."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    try:
        if not torch.cuda.is_available():
            return 0
        if not (torch.cuda.is_initialized() or "vllm" in sys.modules):
            return 0
        return int(torch.cuda.device_count())
    except Exception:  # a broken driver must not fail a finished stage
        return 0


def process_cost(wall_seconds: float) -> dict:
    """What this process and its waited-for children (torchrun ranks, vLLM workers) used so far
    (api/cost.py). ru_maxrss is KiB on Linux; the peak is one process's, the larger of self and children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    gpus = _gpus_used()
    return {"wallSeconds": round(wall_seconds, 3),
            "cpuSeconds": round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 3),
            "peakMemoryBytes": int(max(me.ru_maxrss, kids.ru_maxrss) * scale),
            "gpus": gpus, "gpuSeconds": round(gpus * wall_seconds, 3)}


def _write_termination_log(result: dict) -> None:
    path = os.environ.get("BRANCHMERGE_TERMINATION_LOG")
    if not path:
        return
    # exitCode: the stage's own class (2 permanent, 3 retryable) reaches the operator even when a launcher
    # (torchrun re-raises ChildFailedError: exit 1) replaces the process's exit code with its own
    compact = {k: result[k] for k in ("phase", "outputUri", "digest", "error", "exitCode", "cost") if k in result}
    compact["metrics"] = _flat_metrics(result.get("metrics", {}))
    text = json.dumps(compact, separators=(",", ":"), allow_nan=False)
    if len(text.encode()) > TERMINATION_LOG_LIMIT:  # keep the essentials; full metrics are in the result file
        compact["metrics"] = {}
        text = json.dumps(compact, separators=(",", ":"))[:TERMINATION_LOG_LIMIT]
    try:
        Path(path).write_text(text)
    except OSError:
        pass


def run_stage(stage: str, spec_file: str | Path, result_file: str | Path | None = None) -> int:
    """Run one stage; returns the process exit code."""
    started = time.time()
    rank, world = _rank()
    result: dict[str, Any] = {"stage": stage, "startedAt": started}
    code = EXIT_OK
    try:
        if stage not in STAGES:
            raise InvalidInput(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        resource = load_spec_file(spec_file)
        if resource.kind != STAGES[stage]:  # type: ignore[attr-defined]
            raise InvalidInput(f"stage {stage} runs {STAGES[stage]} manifests, got {resource.kind}")  # type: ignore
        output_uri = resource.spec.output.uri  # type: ignore[attr-defined]
        if not output_uri:
            raise InvalidInput("spec.output.uri: required by the stage (the control plane assigns a default)")
        try:
            output_dir = local_path(output_uri)
        except UnresolvableUri as err:
            raise InvalidInput(f"spec.output.uri: {err}") from None
        result.update(kind=resource.kind, name=resource.name, outputUri=output_uri)  # type: ignore
        module = importlib.import_module(f"branchmerge.trainer.{stage}.stage")
        progress = Progress(enabled=rank == 0)
        if rank == 0 and os.environ.get(PROGRESS_URL_ENV):  # on Kubernetes: live progress to the operator
            from .progress_k8s import ReportSink

            progress.add_sink(ReportSink.from_env())
        ctx = StageContext(resource, output_uri, output_dir, progress, rank, world)
        # the commit each hf:// input was staged at: in the output's manifest, the result and status.metrics
        inputs = staged_sources(resource.spec.model_dump(mode="json", by_alias=True))  # type: ignore
        lineage = lineage_record(resource, {s["uri"]: s["commit"] for s in inputs if s.get("commit")})
        # the cost is read when the output is published: a model card's total can then sum its upstreams'
        with manifest_fields(lineage=lineage, cost=lambda: process_cost(time.time() - started),
                             **({"inputs": inputs} if inputs else {})):
            metrics = module.run(ctx) or {}
        if rank == 0 and resource.kind in CARD_KINDS:  # type: ignore[attr-defined]
            cards.after_publish(resource, output_dir)
        if inputs:
            result["inputs"] = inputs
            metrics = {**metrics, "inputCommits": {s["uri"]: s["commit"] for s in inputs}}
        if rank == 0:
            files = read_manifest(output_dir)
            if files is None:
                raise StageError(f"stage {stage} finished without publishing {output_dir}")
            # finite(): a NaN loss is reported as null; the API server rejects NaN in the CR's status
            result.update(phase="Succeeded", files=files, digest=combined_digest(files), metrics=finite(metrics))
    except StageError as err:
        code = err.exit_code
        result.update(phase="Failed", error=str(err), exitCode=code)
    except Exception as err:  # unexpected: report it, let the control plane retry with backoff
        code = EXIT_RETRYABLE
        result.update(phase="Failed", error=f"{type(err).__name__}: {err}", exitCode=code)
        traceback.print_exc()
    result["finishedAt"] = time.time()
    result["wallSeconds"] = round(result["finishedAt"] - started, 3)
    result["cost"] = process_cost(result["wallSeconds"])
    if code != EXIT_OK:
        print(f"branchmerge stage {stage}: {result['error']}", file=sys.stderr)
    if rank == 0:
        if result_file:
            write_json_atomic(Path(result_file), result)
        _write_termination_log(result)
    elif code != EXIT_OK:
        # A failing rank other than 0 reports too: under torchrun its failure makes the launcher stop every
        # rank (rank 0 is killed before it can write) and exit 1, so this is the only record of the class.
        if result_file and not Path(result_file).exists():
            write_json_atomic(Path(result_file), {**result, "rank": rank})
        _write_termination_log({**result, "error": f"rank {rank}: {result['error']}"})
    return code
