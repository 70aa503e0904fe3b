"""The registry of hypergradient methods: selection by name, its errors, and what registers."""

from dataclasses import dataclass

import pytest

from metareweight import Unrolled, available_methods, get_hypergradient
from metareweight.core.hypergrad import base


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so classes defined by a test do not outlive it."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    return base._REGISTRY


@pytest.mark.parametrize("name,opts,msg", [
    ("unroled", None, "Did you mean 'unrolled'"),
    ("neumann", {"iterations": 3}, "unknown option"),
    ("finite_difference", {"alpha": -1.0}, "positive"),
])
def test_bad_method_names_and_options(name, opts, msg):
    with pytest.raises(ValueError, match=msg):
        get_hypergradient(name, opts)


def test_a_subclass_without_its_own_name_does_not_replace_its_parent(registry):
    @dataclass
    class Traced(Unrolled):
        """A variant (e.g. with logging) that inherits ``name = "unrolled"``."""

    assert type(get_hypergradient("unrolled")) is Unrolled
    assert Traced.name == "unrolled" and Traced not in registry.values()


def test_a_subclass_with_its_own_name_registers_under_it(registry):
    @dataclass
    class Traced(Unrolled):
        name = "traced_unrolled"

    assert "traced_unrolled" in available_methods() and type(get_hypergradient("traced_unrolled")) is Traced
    assert type(get_hypergradient("unrolled")) is Unrolled


def test_a_name_taken_by_another_class_is_refused(registry):
    with pytest.raises(ValueError, match="'unrolled' is already registered by metareweight.*Unrolled; give .*Mine"):
        @dataclass
        class Mine(base.HypergradMethod):
            name = "unrolled"
    assert type(get_hypergradient("unrolled")) is Unrolled
    with pytest.raises(ValueError, match="non-empty string"):
        class Empty(base.HypergradMethod):
            name = ""
