"""experiments/reproduce.py: re-running a RESULTS.md section and comparing with the numbers recorded in
experiments/expected.yaml (issue 22)."""

import doctest
import json
import re
from pathlib import Path

import pytest
import yaml

from experiments import reproduce

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # the recorded numbers are one-thread runs (RESULTS.md, mwnet)


def test_doctests():
    assert doctest.testmod(reproduce).failed == 0


def test_every_entry_cites_a_results_section_and_a_script_or_a_reason():
    sections = set(re.findall(r"<!-- section: (\w+) -->", (ROOT / "experiments" / "RESULTS.md").read_text()))
    entries = reproduce.load_expected()
    assert {e["section"] for e in entries.values()} == sections  # every section is covered (run or skipped)
    for name, e in entries.items():
        if "skip" in e:
            assert "python" in e["skip"], name  # a skipped entry names the full command
        else:
            assert (ROOT / "experiments" / f"{e['script']}.py").exists(), name
            assert e["checks"] and all(c["tolerance"] > 0 for c in e["checks"]), name


def test_the_cheapest_section_reproduces_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert reproduce.main(["mwnet", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["mwnet"]["rows"]
    assert len(rows) == 6 and all(r[-1] == "ok" for r in rows)
    assert "recorded" in capsys.readouterr().out


def _expected(tmp_path, recorded, seeds=(0,)):
    path = tmp_path / "expected.yaml"
    path.write_text(yaml.safe_dump({"toy": {
        "section": "mwnet", "cites": "a test", "script": "mwnet", "argv": [], "seeds": list(seeds),
        "checks": [{"name": "accuracy", "key": "per_seed/{i}/acc" if isinstance(recorded, dict) else "acc",
                    "recorded": recorded, "tolerance": 0.01}]}}))
    return str(path)


@pytest.mark.parametrize("recorded, code", [(0.505, 0), (0.6, 1)])
def test_a_miss_exits_non_zero(tmp_path, monkeypatch, recorded, code):
    monkeypatch.setattr(reproduce, "run_entry", lambda name, entry, seeds: {"acc": 0.5})
    assert reproduce.main(["toy", "--set", f"expected={_expected(tmp_path, recorded)}"]) == code


def test_numbers_recorded_for_other_seeds_are_errors_not_passes(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(reproduce, "run_entry",
                        lambda name, entry, seeds: seen.append(seeds) or {"acc": 0.5, "per_seed": [{"acc": 0.7}]})
    assert reproduce.main(["toy", "--seeds", "1", "--set", f"expected={_expected(tmp_path, 0.5)}"]) == 1
    per_seed = _expected(tmp_path, {0: 0.5, 1: 0.7})
    assert reproduce.main(["toy", "--seeds", "1", "--set", f"expected={per_seed}"]) == 0
    assert reproduce.main(["toy", "--seeds", "2", "--set", f"expected={per_seed}"]) == 1
    assert seen == [[1], [1], [2]]
    rows, ok = reproduce.compare([{"name": "a", "key": "nope", "recorded": 1.0, "tolerance": 0.1}], {"acc": 1.0},
                                 [0], [0])
    assert not ok and rows[0][2].startswith("error: ") and "nope" in rows[0][2]


def test_list_and_unknown_section(capsys):
    assert reproduce.main(["--list"]) == 0
    assert "skipped: timing" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown section or entry 'nope'"):
        reproduce.main(["nope"])


def test_a_command_that_fails_is_a_miss(tmp_path, monkeypatch, capsys):
    def broken(name, entry, seeds):
        raise RuntimeError("conflicting option string: --quick")
    monkeypatch.setattr(reproduce, "run_entry", broken)
    assert reproduce.main(["toy", "--set", f"expected={_expected(tmp_path, 0.5)}"]) == 1
    assert "the command failed: RuntimeError: conflicting option string" in capsys.readouterr().out
