"""Small valid manifests of each kind, for tests to mutate."""
import copy

API = "branchmerge.dev/v1alpha1"

VALID = {
    "TeacherGen": {
        "apiVersion": API, "kind": "TeacherGen", "metadata": {"name": "traces"},
        "spec": {
            "teacher": {"model": {"uri": "file:///models/teacher"}},
            "prompts": {"dataset": {"uri": "file:///data/prompts.jsonl"}},
            "verify": {"kind": "math", "answerField": "answer"},
            "select": {"mode": "first-correct"},
        },
    },
    "BranchSFT": {
        "apiVersion": API, "kind": "BranchSFT", "metadata": {"name": "math"},
        "spec": {
            "base": {"uri": "hf://org/student@main", "allowPatterns": ["*.safetensors", "*.json", "tokenizer*"]},
            "data": [{"from": {"kind": "TeacherGen", "name": "traces"}}],
            "training": {"globalBatchSize": 8, "microBatchSize": 2},
        },
    },
    "Merge": {
        "apiVersion": API, "kind": "Merge", "metadata": {"name": "merged"},
        "spec": {
            "method": "ties",
            "base": {"uri": "pvc://models/base"},
            "models": [{"from": {"kind": "BranchSFT", "name": "math"}, "density": 0.5},
                       {"uri": "s3://bucket/code", "density": 0.5, "weight": 2}],
        },
    },
    "Eval": {
        "apiVersion": API, "kind": "Eval", "metadata": {"name": "bench"},
        "spec": {
            "model": {"from": {"kind": "Merge", "name": "merged"}},
            "benchmarks": [{"name": "aime24", "kind": "math", "samples": 4,
                            "dataset": {"uri": "file:///data/aime24.jsonl"}}],
        },
    },
}


def valid(kind: str) -> dict:
    return copy.deepcopy(VALID[kind])
