"""Types shared by the four kinds: references, output, resources, run policy, sampling, status."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .base import ApiModel, Rule

GROUP = "branchmerge.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KINDS = ("TeacherGen", "BranchSFT", "Merge", "Eval", "MergeSearch")

# hf://[models/|datasets/|spaces/]org/name[@revision][/path] (api/uris.py parse_hf_uri: the rest of the rules)
URI_PATTERN = r"^(hf://((models|datasets|spaces)/)?[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(@[^/\s]+)?(/[^\s]*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?|s3://[^/\s]+(/[^\s]*)?|file:///[^\s]*)$"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

Uri = Annotated[
    str,
    Field(
        pattern=URI_PATTERN,
        max_length=2048,
        description="hf://[datasets/]org/name[@revision][/path], pvc://claim/path, s3://bucket/key or "
                    "file:///absolute/path.",
    ),
]
Name = Annotated[str, Field(pattern=NAME_PATTERN, min_length=1, max_length=253)]
# An extended resource: a domain-prefixed name (rdma/ib, nvidia.com/hostdev); cpu/memory/GPUs have own fields.
ExtendedResourceName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
                                            max_length=253)]
Quantity = Annotated[
    str,
    Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$", max_length=64,
          description="A Kubernetes quantity, e.g. 8, 500m, 64Gi."),
]

_EXACTLY_ONE = Rule("has(self.uri) != has(self.from)", "exactly one of uri or from must be set")
_PATTERNS_NEED_HF = Rule("!has(self.allowPatterns) || (has(self.uri) && self.uri.startsWith('hf://'))",
                         "allowPatterns selects the files of an hf:// download; it needs an hf:// uri",
                         field=".allowPatterns")
# A repository file pattern: relative (no leading '/'), one line.
AllowPattern = Annotated[str, Field(pattern=r"^[^/\n][^\n]*$", min_length=1, max_length=512)]
AllowPatterns = Annotated[list[AllowPattern], Field(min_length=1, max_length=64)]


class ModelFrom(ApiModel):
    """An upstream CR in the same namespace whose output is a model."""

    kind: Literal["BranchSFT", "Merge", "MergeSearch"]
    """Kind of the upstream CR: BranchSFT, Merge, or MergeSearch (its winner)."""
    name: Name
    """Name of the upstream CR."""


class DatasetFrom(ApiModel):
    """An upstream CR in the same namespace whose output is a dataset."""

    kind: Literal["TeacherGen"]
    """Kind of the upstream CR: TeacherGen."""
    name: Name
    """Name of the upstream CR."""


class ModelRef(ApiModel):
    """A model: a Hugging Face folder at a URI, or the output of an upstream BranchSFT or Merge."""

    rules = (_EXACTLY_ONE, _PATTERNS_NEED_HF)
    uri: Uri | None = None
    """Where the model is (hf://, pvc://, s3://, file://)."""
    allow_patterns: AllowPatterns | None = None
    """hf:// only: stage just the repository files matching one of these patterns (relative to the URI's
    path; huggingface_hub's allow_patterns: fnmatch, '*' also crosses '/', a pattern ending in '/' is that
    folder), e.g. ["*.safetensors", "*.json"] skips a repository's original/ or .bin copies."""
    from_: ModelFrom | None = Field(default=None, alias="from")
    """Use the output of this upstream CR once it has succeeded."""


class DatasetRef(ApiModel):
    """A dataset (JSONL or Parquet): a URI, or the output of an upstream TeacherGen."""

    rules = (_EXACTLY_ONE, _PATTERNS_NEED_HF)
    uri: Uri | None = None
    """Where the dataset is (a file or a folder of .jsonl/.parquet files)."""
    allow_patterns: AllowPatterns | None = None
    """hf:// only: stage just the repository files matching one of these patterns (relative to the URI's
    path; huggingface_hub's allow_patterns: fnmatch, '*' also crosses '/', a pattern ending in '/' is that
    folder), e.g. ["*.safetensors", "*.json"] skips a repository's original/ or .bin copies."""
    from_: DatasetFrom | None = Field(default=None, alias="from")
    """Use the output of this upstream TeacherGen once it has succeeded."""


class Output(ApiModel):
    """Where the stage writes its result."""

    uri: Uri | None = None
    """Output location. When absent the control plane chooses one (local: the workdir; Kubernetes: the
    operator's default storage)."""


class SecretKeyRef(ApiModel):
    """A key of a Secret in the CR's namespace. Secrets are only ever referenced, never inlined."""

    name: Name
    """Secret name."""
    key: Annotated[str, Field(min_length=1, max_length=253)]
    """Key within the Secret's data."""


class EnvVarSource(ApiModel):
    secret_key_ref: SecretKeyRef
    """Read the value from this Secret key."""


class EnvVar(ApiModel):
    """An environment variable for the stage's containers."""

    rules = (Rule("has(self.value) != has(self.valueFrom)", "exactly one of value or valueFrom must be set"),)
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
    """Variable name."""
    value: Annotated[str, Field(max_length=32768)] | None = None
    """Literal value (not for secrets: use valueFrom)."""
    value_from: EnvVarSource | None = None
    """Value from a Secret key."""


class Toleration(ApiModel):
    """A Kubernetes toleration (e.g. for tainted GPU nodes)."""

    key: Annotated[str, Field(max_length=316)] | None = None
    """Taint key (empty with operator Exists: tolerate everything)."""
    operator: Literal["Exists", "Equal"] = "Equal"
    value: Annotated[str, Field(max_length=63)] | None = None
    """Taint value (operator Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect; empty matches all effects."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated before eviction."""


class Resources(ApiModel):
    """Where and how big the stage's pods are."""

    nodes: Annotated[int, Field(ge=1, le=1024)] = 1
    """Number of pods (nodes) for multi-node training or data-parallel generation."""
    gpus_per_node: Annotated[int, Field(ge=0, le=16)] = 0
    """nvidia.com/gpu per pod; 0 runs on CPU."""
    cpu: Quantity | None = None
    """CPU request and limit per pod."""
    memory: Quantity | None = None
    """Memory request and limit per pod."""
    shm_size: Quantity | None = None
    """Size of /dev/shm (NCCL, dataloaders); defaults to a size derived from the GPU count."""
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict)
    """Node labels the pods must match (e.g. a GPU product label)."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    """Tolerations for tainted (GPU) nodes."""
    priority_class_name: Name | None = None
    """PriorityClass of the pods (preemption order)."""
    image: Annotated[str, Field(max_length=512)] | None = None
    """Container image; defaults to the operator's trainer image."""
    env: Annotated[list[EnvVar], Field(max_length=128)] = Field(default_factory=list)
    """Extra environment variables of the stage's containers."""
    extra_resources: Annotated[dict[ExtendedResourceName, Quantity], Field(max_length=16)] = Field(default_factory=dict)
    """Further extended resources per pod, requested and limited alike: an RDMA device for NCCL over
    InfiniBand/RoCE (e.g. ``rdma/ib: "1"`` or ``nvidia.com/hostdev: "8"``, named by your device plugin)."""
    pod_annotations: Annotated[dict[Annotated[str, Field(max_length=316)], Annotated[str, Field(max_length=65536)]],
                               Field(max_length=64)] = Field(default_factory=dict)
    """Annotations on the pods, e.g. ``k8s.v1.cni.cncf.io/networks`` for Multus secondary networks."""
    ipc_lock: bool = False
    """Add the IPC_LOCK capability to the stage container (every other capability stays dropped). RDMA pins
    memory; a non-root process usually gets no added capability from the runtime, so the node's memlock limit
    decides (docs/operations.md, "NCCL over InfiniBand/RoCE"). Needs the privileged Pod Security level."""
    image_pull_secrets: Annotated[list[Name], Field(max_length=16)] = Field(default_factory=list)
    """Secrets (in the CR's namespace) used to pull the stage image from a private registry."""
    queue_name: Name | None = None
    """Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label on the Job."""
    suspend: bool = False
    """Suspend the stage (also in flight: a running Job is suspended and resumed later)."""


class RunPolicy(ApiModel):
    """Retries and deadlines."""

    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Retries after a retryable failure (preemption, eviction, OOM kill, exit code 3)."""
    backoff_seconds: Annotated[int, Field(ge=0, le=86400)] = 30
    """Delay before the first retry; doubles with each further retry."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Fail an attempt that runs longer than this."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete finished child Jobs after this many seconds (the CR and its status stay)."""


class Sampling(ApiModel):
    """Sampling parameters (vLLM semantics)."""

    temperature: Annotated[float, Field(ge=0, le=10)] = 0.6
    """Sampling temperature (TinyR1: 0.6; 0 is greedy)."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    """Nucleus sampling mass."""
    top_k: Annotated[int, Field(ge=-1)] = -1
    """-1 disables top-k."""
    max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] = 32768
    """Maximum generated tokens per sample; longer answers are truncated (and counted)."""
    seed: int = 0
    """Base seed; per-request seeds derive from it, so runs are reproducible."""
    stop: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=16)] = Field(default_factory=list)
    """Stop strings (the chat template's end-of-turn token always stops)."""


# The stage reads an endpoint's API key from this variable; the control plane fills it from
# ``apiKeySecretRef`` (a secretKeyRef on the cluster, the runner's own environment locally).
API_KEY_ENV = "BRANCHMERGE_API_KEY"


class Endpoint(ApiModel):
    """An OpenAI-compatible server (vLLM serve, SGLang, a hosted API)."""

    base_url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)]
    """e.g. http://teacher:8000/v1"""
    model: Annotated[str, Field(min_length=1, max_length=512)]
    """Model name as the server knows it."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the API key (sent as a bearer token)."""
    max_concurrency: Annotated[int, Field(ge=1, le=4096)] = 32
    """Requests in flight at once (per worker)."""
    stream: bool = True
    """Stream answers (server-sent events): a long reasoning trace is never cut by a timeout while tokens
    keep arriving. false: one response per request (for servers without streaming)."""
    timeout_seconds: Annotated[float, Field(gt=0)] = 600
    """Streaming: the longest silence (no token) before the request is retried, the wait for the first
    token included. Without streaming: the timeout of the whole request."""
    max_retries: Annotated[int, Field(ge=0, le=100)] = 8
    """Retries on 429, 5xx and timeouts, with exponential backoff and jitter (Retry-After honoured)."""


class Engine(ApiModel):
    """How text is generated: an offline vLLM engine, an OpenAI-compatible endpoint, or transformers."""

    rules = (
        Rule("self.name != 'openai' || has(self.endpoint)", "the openai engine needs an endpoint", ".endpoint",
             "FieldValueRequired"),
    )
    name: Literal["vllm", "openai", "transformers"] = "vllm"
    """vllm: offline engine in the pod; openai: a remote endpoint; transformers: plain generate (fallback)."""
    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    """GPUs one engine spans (vLLM tensor parallelism)."""
    data_parallel_size: Annotated[int, Field(ge=1, le=1024)] = 1
    """Engine replicas. TeacherGen and Eval run one engine per worker pod, so the replicas are the pods
    (``resources.nodes``, each with ``gpusPerNode`` = ``tensorParallelSize``) and this should equal that count;
    the stage goes by the pod count and says so when they differ."""
    max_model_len: Annotated[int, Field(ge=16)] | None = None
    """Context length of the engine (prompt + answer); defaults to the model's."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights and activations dtype."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Share of GPU memory vLLM may take (weights + KV cache)."""
    enforce_eager: bool = False
    """Disable CUDA graphs / compilation (faster start, slower decode)."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless asked."""
    endpoint: Endpoint | None = None
    chat_template: Annotated[str, Field(max_length=65536)] | None = None
    """Jinja chat template overriding the model's."""


# ---- status -------------------------------------------------------------------------------------------

Phase = Literal["Pending", "Waiting", "Running", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]
# The phases a run ends in. A CR stays in one until its spec changes or a rerun is asked for; a search's trial
# in one is done.
TERMINAL: tuple[str, ...] = ("Succeeded", "Failed")


class Condition(ApiModel):
    """A metav1.Condition."""

    type: Annotated[str, Field(max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(max_length=1024)]
    message: Annotated[str, Field(max_length=32768)] = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Progress(ApiModel):
    fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    message: str = ""


class OutputStatus(ApiModel):
    uri: str | None = None
    digest: str | None = None
    """sha256 over the output's file digests (see the stage's result manifest)."""


class Cost(ApiModel):
    """What the run used (api/cost.py), summed over its attempts: a retry costs as much as it ran."""

    wall_seconds: Annotated[float, Field(ge=0)] | None = None
    """Wall time: locally the stage process's; on Kubernetes from the first pod's start to the last pod's
    finish (container startedAt/finishedAt)."""
    cpu_seconds: Annotated[float, Field(ge=0)] | None = None
    """User + system CPU time of the stage process and its children (ranks, engine workers)."""
    peak_memory_bytes: Annotated[int, Field(ge=0)] | None = None
    """Largest resident set size of one of its processes."""
    gpus: Annotated[int, Field(ge=0)] | None = None
    """GPUs held (on Kubernetes: requested by all its pods together); 0 on CPU."""
    gpu_seconds: Annotated[float, Field(ge=0)] | None = None
    """GPUs x wall, summed over pods: what a cluster bills, busy or not."""
    attempts: Annotated[int, Field(ge=0)] | None = None
    """Attempts whose use the sums include."""


class Status(ApiModel):
    """Observed state, written only by the control plane."""

    phase: Phase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    progress: Progress | None = None
    output: OutputStatus | None = None
    attempts: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)
    """Stage metrics (tokens generated, loss, scores, ...)."""
    cost: Cost | None = None
    """Wall time, CPU and GPU time and peak memory of the run (all its attempts)."""


class Metadata(ApiModel):
    """The part of metav1.ObjectMeta a manifest sets."""

    model_config = ApiModel.model_config | {"extra": "allow"}
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    namespace: Annotated[str, Field(max_length=63)] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
