"""Merge stage: a streaming, bounded-memory model-merge engine over safetensors folders."""
