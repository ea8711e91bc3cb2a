"""The CPU quickstart: three synthetic domains with checkable answers, tiny models, and the Branch-Merge
pipeline over them (see examples/quickstart/README.md)."""
