"""The public API is what ``metareweight/__init__.py`` lists, and it covers every objective and method."""

import inspect

import metareweight
from metareweight import objectives
from metareweight.core.hypergrad import HypergradMethod


def test_every_listed_name_exists_once():
    assert len(metareweight.__all__) == len(set(metareweight.__all__))
    assert [n for n in metareweight.__all__ if not hasattr(metareweight, n)] == []
    assert [n for n in objectives.__all__ if not hasattr(objectives, n)] == []


def test_every_objective_and_hypergradient_method_is_public():
    def public_subclasses(module, base):
        return {n for n, v in vars(module).items()
                if inspect.isclass(v) and issubclass(v, base) and v is not base and not n.startswith("_")}

    assert public_subclasses(objectives, objectives.MetaObjective) <= set(metareweight.__all__)
    for name in metareweight.available_methods():  # every method selectable by name is importable by class
        method = metareweight.get_hypergradient(name)
        assert isinstance(method, HypergradMethod) and type(method).__name__ in metareweight.__all__, name
