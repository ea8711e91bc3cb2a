"""No dead code in the product (api/, operator/, trainer/, branchmerge/): vulture over the tree, with the tests,
benches, stand-in cluster and scripts counted as users.

Confidence 60 is where vulture reports unused functions, classes, methods and properties; those, unused imports,
unreachable code and unused local variables (100) fail the test. Unused attributes and class variables are not
judged: they are the API models' fields (pydantic reads them by name, the CRDs and manifests by alias) and kopf's
settings, which vulture cannot see being read. Names a framework calls are in tests/vulture_whitelist.py."""
from __future__ import annotations

from pathlib import Path

import vulture

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("api", "operator", "trainer", "branchmerge")
USERS = ("tests", "bench", "testcluster", "scripts", "examples")
JUDGED = {"function", "class", "method", "property", "import", "unreachable_code"}


def test_nothing_in_the_product_is_unused():
    v = vulture.Vulture()
    v.scavenge([str(REPO / p) for p in PRODUCT + USERS] + [str(REPO / "tests" / "vulture_whitelist.py")])
    found = [item for item in v.get_unused_code(min_confidence=60)
             if Path(item.filename).resolve().relative_to(REPO).parts[0] in PRODUCT
             and (item.typ in JUDGED or item.confidence == 100)]
    assert not found, "unused code:\n" + "\n".join(item.get_report(add_size=False) for item in found)
