"""The four custom resources (apiVersion/kind/metadata/spec/status) and their CRD presentation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from .base import ApiModel
from .common import API_VERSION, Metadata, Status
from .eval import EvalSpec
from .merge import MergeSpec
from .mergesearch import MergeSearchSpec
from .sft import BranchSFTSpec
from .teachergen import TeacherGenSpec


class CustomResource(ApiModel):
    api_version: Literal["branchmerge.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    metadata: Metadata
    status: Status | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> str:
        """Kind/name, the identity within a namespace."""
        return f"{self.kind}/{self.metadata.name}"  # type: ignore[attr-defined]


class TeacherGen(CustomResource):
    """Generate verified reasoning traces with a teacher model."""

    kind: Literal["TeacherGen"] = "TeacherGen"
    spec: TeacherGenSpec


class BranchSFT(CustomResource):
    """Fine-tune one branch (domain expert) of the student."""

    kind: Literal["BranchSFT"] = "BranchSFT"
    spec: BranchSFTSpec


class Merge(CustomResource):
    """Merge domain experts into one model."""

    kind: Literal["Merge"] = "Merge"
    spec: MergeSpec


class Eval(CustomResource):
    """Benchmark a model."""

    kind: Literal["Eval"] = "Eval"
    spec: EvalSpec


class MergeSearch(CustomResource):
    """Search merges of the same branches (method, parameters, order) scored on a development split."""

    kind: Literal["MergeSearch"] = "MergeSearch"
    spec: MergeSearchSpec



@dataclass(frozen=True)
class KindInfo:
    """How a kind presents itself in the cluster (CRD names, printer column, stage entry point)."""

    model: type[CustomResource]
    plural: str
    short_names: tuple[str, ...]
    stage: str | None  # None: no stage of its own (MergeSearch runs Merge and Eval children)
    column: tuple[str, str, str]  # name, type, JSONPath of the stage-specific printer column


KIND_INFO: dict[str, KindInfo] = {
    "TeacherGen": KindInfo(TeacherGen, "teachergens", ("tg",), "teachergen",
                           ("Kept", "integer", ".status.metrics.samplesKept")),
    "BranchSFT": KindInfo(BranchSFT, "branchsfts", ("bsft", "sft"), "sft",
                          ("Domain", "string", ".spec.domain")),
    "Merge": KindInfo(Merge, "merges", ("bmerge",), "merge", ("Method", "string", ".spec.method")),
    "Eval": KindInfo(Eval, "evals", ("beval",), "eval", ("Score", "number", ".status.metrics.score")),
    "MergeSearch": KindInfo(MergeSearch, "mergesearches", ("msearch",), None,
                            ("Trials", "integer", ".status.metrics.trialsDone")),
}
