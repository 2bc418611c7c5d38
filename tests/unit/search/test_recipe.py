"""Recipes: validated, versioned, round-trip, and only registered passes with real options."""

from __future__ import annotations

import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.search.recipe import Recipe, dump_recipe, load_recipe


def _full():
    return {
        "model": "runs/mnist", "calib": "c.npz", "eval": "e.npz", "metric": "accuracy", "target": "cortex-m7",
        "prefer": "size", "constraints": {"max_drop": 0.01, "max_ram_bytes": 262144},
        "passes": [{"pass": "export", "options": {"opset": [17, 18]}, "optional": False}],
        "search": {"trials": 8, "seed": 3, "sampler": "nsga2"},
    }


def test_round_trip_through_yaml(tmp_path):
    r = Recipe.from_dict(_full())
    assert Recipe.from_dict(r.to_dict()) == r
    (tmp_path / "r.yaml").write_text(dump_recipe(r))
    again = load_recipe(tmp_path / "r.yaml")
    assert again.constraints == r.constraints and again.passes == r.passes and again.search == r.search
    assert again.model == str((tmp_path / "runs/mnist").resolve())  # relative to the recipe file


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(version=2), "recipe version 2 is not supported"),
    (lambda d: d.update(colour="red"), "unknown key(s) colour"),
    (lambda d: d["passes"].append({"pass": "rm-rf"}), "unknown pass 'rm-rf'"),
    (lambda d: d["passes"].append({"pass": "export", "options": {"shell": "x"}}), "pass 'export' has no option 'shell'"),
    (lambda d: d["passes"].append({"pass": "export", "options": {"opset": [13]}}), "opset must be >= 17"),
    (lambda d: d["constraints"].update(max_drop=-1), "constraints.max_drop must be a non-negative number"),
    (lambda d: d["search"].update(sampler="magic"), "search.sampler must be one of"),
    (lambda d: d.pop("model"), "'model' is required"),
])
def test_invalid_recipes_are_refused(mutate, message):
    data = _full()
    mutate(data)
    with pytest.raises(EdgekilnError) as err:
        Recipe.from_dict(data)
    assert message in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    (tmp_path / "r.yaml").write_text("model: [unclosed")
    with pytest.raises(EdgekilnError, match=r"r.yaml: not valid YAML"):
        load_recipe(tmp_path / "r.yaml")
