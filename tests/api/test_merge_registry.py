"""The merge-method registry is the one list: the API, the stage's checks and the engine agree with it."""
import pytest

from branchmerge.api import merge_methods as registry
from branchmerge.api.merge import GLOBAL_FIELDS, METHODS as API_METHODS, MODEL_FIELDS, MergeSpec
from branchmerge.api.validation import InvalidManifest, parse_resource
from branchmerge.trainer.errors import InvalidInput
from branchmerge.trainer.merge.methods import METHODS as ENGINE_METHODS
from branchmerge.trainer.merge.params import ParamResolver, check_parameters

from .conftest import valid


def test_api_methods_equal_engine_methods():
    assert list(API_METHODS) == list(registry.names())
    assert sorted(API_METHODS) == sorted(ENGINE_METHODS), "a method is in the registry but not in METHODS, or back"
    assert set(MergeSpec.model_fields["method"].annotation.__args__) == set(ENGINE_METHODS)


@pytest.mark.parametrize("name", registry.names())
def test_module_parameters_equal_its_row(name):
    module, row = ENGINE_METHODS[name], registry.row(name)
    assert module.NAME == name
    assert module.ACCEPTS == row.parameters, f"{name}: module reads {sorted(module.ACCEPTS)}, row says {sorted(row.parameters)}"
    # the engine's anchor follows the base policy: "base" needs one; "first" is the base or the first model
    assert (module.ANCHOR == "base") == (row.base == "required"), name
    assert row.base != "forbidden" or module.ANCHOR is None, name


def test_every_registry_parameter_is_on_the_wire_and_resolved():
    wire = set(GLOBAL_FIELDS.values()) | set(MODEL_FIELDS.values())
    assert set(registry.PARAMS) <= wire, "a registry parameter has no field in MergeParameters or MergeInput"
    for name, p in registry.PARAMS.items():
        assert (name in MODEL_FIELDS.values()) == (p.scope == "model"), name
    # every parameter a row uses is resolved into TensorParams with its default when unset
    spec = parse_resource(valid("Merge")).spec
    params = ParamResolver(spec, [0, 1]).for_tensor("x")
    assert params.gammas == (0.01, 0.01) and params.epsilons == (0.15, 0.15)
    assert params.select_topk == 1.0 and params.max_iter == 10 and params.nuslerp_flatten is True


def test_rows_are_well_formed():
    for r in registry.ROWS:
        assert r.required <= r.parameters, r.name
        assert r.max_models is None or r.max_models >= r.min_models >= 1, r.name
        assert not r.base_in_models or r.base != "forbidden", r.name
        assert set(r.defaults) <= r.parameters, r.name
        assert r.paper and (r.arxiv is None or r.arxiv[:4].isdigit()), r.name


def valid_for(row: registry.MethodRow) -> dict:
    """A valid Merge of ``row``'s method: its number of models, its base policy, its required parameters."""
    doc = valid("Merge")
    models = [{"uri": f"file:///models/m{i}"} for i in range(max(2, row.min_models))]
    spec = {"method": row.name, "models": models, "parameters": {}}
    if row.base != "forbidden":
        spec["base"] = dict(models[0]) if row.base_in_models else {"uri": "file:///models/base"}
    for name in row.required:
        if registry.PARAMS[name].scope == "model":
            for m in models:
                m[name] = 0.5
        else:
            spec["parameters"][name] = 0.5
    doc["spec"] = spec
    return doc


@pytest.mark.parametrize("name", registry.names())
def test_valid_for_each_method_is_valid(name):
    check_parameters(parse_resource(valid_for(registry.row(name))).spec)


@pytest.mark.parametrize("name", registry.names())
def test_each_method_rejects_a_parameter_it_does_not_use(name):
    """For every method, the API (pydantic + CEL) and the stage both reject a global parameter of another
    method, field path first."""
    row = registry.row(name)
    unused = next(p for p in GLOBAL_FIELDS.values() if p not in row.parameters and p not in registry.NEUTRAL
                  and registry.PARAMS[p].kind is not bool)
    value = _inside(registry.PARAMS[unused])
    doc = valid_for(row)
    doc["spec"]["parameters"][unused] = value
    with pytest.raises(InvalidManifest) as info:
        parse_resource(doc)
    assert [e.path for e in info.value.errors] == [f"spec.parameters.{unused}"], info.value.errors
    # the stage's own check, on a spec that skipped the API's CEL rules (pydantic alone)
    with pytest.raises(InvalidInput, match=rf"^spec\.parameters\.{unused}: unknown parameter for {name}"):
        check_parameters(MergeSpec.model_validate(doc["spec"]))


def _inside(p: registry.Param):
    """A value inside the parameter's bounds."""
    lo = next(v for v in (p.ge, p.gt, 0.0) if v is not None)
    hi = next(v for v in (p.le, p.lt, lo + 1.0) if v is not None)
    return int(lo) + 1 if p.kind is int else (lo + hi) / 2


def test_stage_names_the_model_or_override_of_an_unused_parameter():
    doc = valid_for(registry.row("ties"))
    doc["spec"]["models"][1]["gamma"] = 0.1
    with pytest.raises(InvalidInput, match=r"^spec\.models\[1\]\.gamma: unknown parameter for ties"):
        check_parameters(parse_resource(doc).spec)
    doc = valid_for(registry.row("model_stock"))
    doc["spec"]["parameters"]["overrides"] = [{"tensors": "mlp", "weightScale": 2}]
    with pytest.raises(InvalidInput, match=r"^spec\.parameters\.overrides\[0\]\.weightScale: unknown parameter"):
        check_parameters(parse_resource(doc).spec)


def test_neutral_values_of_older_crd_defaults_are_accepted():
    doc = valid_for(registry.row("slerp"))
    doc["spec"]["parameters"].update({"normalize": True, "lambda": 1.0, "rescale": True})
    doc["spec"]["models"][1]["weight"] = 1.0
    check_parameters(parse_resource(doc).spec)


@pytest.mark.parametrize("name", [r.name for r in registry.ROWS if r.min_models > 1 or r.base == "required"])
def test_wrong_model_count_or_missing_base_is_rejected(name):
    row = registry.row(name)
    doc = valid_for(row)
    if row.min_models > 1:
        doc["spec"]["models"] = doc["spec"]["models"][:row.min_models - 1]
        if row.base_in_models:
            doc["spec"]["base"] = dict(doc["spec"]["models"][0])
        with pytest.raises(InvalidManifest, match=f"{name} needs"):
            parse_resource(doc)
        with pytest.raises(InvalidInput, match=rf"^spec\.models: {name} needs"):
            check_parameters(MergeSpec.model_validate(doc["spec"]))
    if row.base == "required":
        doc = valid_for(row)
        del doc["spec"]["base"]
        with pytest.raises(InvalidManifest, match="needs a base"):
            parse_resource(doc)
        with pytest.raises(InvalidInput, match=rf"^spec\.base: method {name} needs a base"):
            check_parameters(MergeSpec.model_validate(doc["spec"]))


def test_reference_lists_every_method():
    text = registry.reference_section()
    for r in registry.ROWS:
        assert f"| `{r.name}` |" in text


def test_della_needs_density_minus_epsilon_above_zero():
    doc = valid_for(registry.row("della"))
    for m in doc["spec"]["models"]:
        m["density"] = 0.1  # the default epsilon 0.15 would give a negative keep probability
    with pytest.raises(InvalidInput, match=r"^spec\.models\[0\]\.density: della needs density - epsilon > 0"):
        check_parameters(parse_resource(doc).spec)
    doc["spec"]["parameters"]["epsilon"] = 0.05
    check_parameters(parse_resource(doc).spec)
    doc["spec"]["models"][1]["epsilon"] = 0.2
    with pytest.raises(InvalidInput, match=r"^spec\.models\[1\]\.epsilon: della needs"):
        check_parameters(parse_resource(doc).spec)


def test_method_defaults_follow_mergekit():
    """Where mergekit 0.1.5's methods default normalize/rescale differently, the rows say so."""
    assert registry.row("ties").default("normalize") is True and registry.row("ties").default("rescale") is False
    for name in ("dare_ties", "dare_linear", "della_linear", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic"):
        assert registry.row(name).default("normalize") is False, name
    assert registry.row("della").default("normalize") is True and registry.row("della").default("rescale") is True
