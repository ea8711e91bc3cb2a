"""branchmerge.operator: the control planes (kopf operator, local runner) and their shared pure logic."""

if __name__ == "operator":
    # This folder was found as the top-level `operator` because the checkout is on sys.path (e.g. `python -m`
    # run from the repository root). It is `branchmerge.operator`; give the name back to the standard library
    # module so nothing else in the process (collections, runpy, ...) breaks. Only `os` and `sys` are used:
    # this can run while the interpreter is still importing its own start-up modules.
    import os as _os
    import sys as _sys
    from importlib.machinery import ModuleSpec as _Spec
    from importlib.machinery import SourceFileLoader as _Loader

    _path = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    _loader = _Loader("operator", _path)
    _module = type(_sys)("operator")
    _module.__spec__ = _Spec("operator", _loader, origin=_path)
    _module.__file__, _module.__loader__ = _path, _loader
    _loader.exec_module(_module)
    _sys.modules["operator"] = _module
