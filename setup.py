"""Maps the design-card folders into the ``branchmerge`` namespace.

``operator/`` must never be importable as the top-level ``operator`` module (a standard-library name),
so every folder is installed under ``branchmerge.*``; metadata lives in pyproject.toml.
"""
from setuptools import find_packages, setup

FOLDERS = {
    "branchmerge": "branchmerge",
    "branchmerge.api": "api",
    "branchmerge.operator": "operator",
    "branchmerge.trainer": "trainer",
}

packages = []
for package, folder in FOLDERS.items():
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=FOLDERS)
