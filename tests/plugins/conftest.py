# The plugin example registers a hypergradient method when imported; only tests/test_plugins.py imports it (and
# restores the registries afterwards), so doctest collection must not.
collect_ignore = ["toy_reweighting.py"]
