"""Re-run a RESULTS.md section's quick (or one-seed) configuration and compare with the recorded numbers.

The recorded numbers, their tolerances and the RESULTS.md passage each one comes from are in
``experiments/expected.yaml`` (one entry per check; an entry's ``section`` is a ``<!-- section: NAME -->`` marker of
``experiments/RESULTS.md``). Prints ``recorded | now | tolerance | ok`` per number and exits non-zero on a miss::

    python -m experiments.reproduce --list
    python -m experiments.reproduce mwnet                 # an entry of expected.yaml (10 s CPU)
    python -m experiments.reproduce domain_weights        # a RESULTS section: every entry of it
    python -m experiments.reproduce mwnet_full --seeds 0 1 2   # a per-seed table: any seeds it records

``--seeds`` (or ``--set seeds=[...]``) replaces the entry's seeds; only numbers recorded for those seeds can be
compared (per-seed tables record one number per seed), so a number recorded for other seeds is an error row, never a
pass. Entries too long to re-run here say so (``skipped: runtime``) with the full command. ``--set
expected=FILE`` reads another file of recorded numbers; ``--out FILE`` writes the comparison as JSON. Run with
``OMP_NUM_THREADS=1`` (the recorded runs used one thread); the Fashion-MNIST entries need ``FASHION_MNIST_DIR`` or the
``dataset-fashion-mnist`` Debian package.
"""

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import yaml

from experiments.common import add_config_args, config_from_args, table, write_json

EXPECTED = Path(__file__).with_name("expected.yaml")


def load_expected(path: Path = EXPECTED) -> Dict[str, Dict]:
    """The entries of ``expected.yaml``, each checked for the fields it needs (a clear error names the entry)."""
    entries = yaml.safe_load(Path(path).read_text()) or {}
    for name, e in entries.items():
        missing = [k for k in ("section", "cites") if k not in e]
        if "skip" not in e:
            missing += [k for k in ("script", "argv", "seeds", "checks") if k not in e]
        if missing:
            raise ValueError(f"{path}: entry {name!r} lacks {missing}")
    return entries


def lookup(result: Any, key: str) -> float:
    """The number at ``key`` in a script's result: ``a/b`` dict keys, ``3`` list indices, ``rows[k=v,k2=v2]`` the one
    list element whose fields match.

    >>> lookup({"per_seed": [{"setting": "a", "acc": 0.5}, {"setting": "b", "acc": 0.7}]}, "per_seed[setting=b]/acc")
    0.7
    >>> lookup([{"x": {"0.25": 1}}], "0/x/0.25")
    1.0
    """
    node = result
    for part in key.split("/"):
        m = re.fullmatch(r"([^\[]+)\[(.+)\]", part)
        name, where = (m.group(1), dict(kv.split("=", 1) for kv in m.group(2).split(","))) if m else (part, None)
        if isinstance(node, list):
            node = node[int(name)]
        elif name not in node:
            raise KeyError(f"{key!r}: no {name!r} here (keys: {sorted(node)[:12]})")
        else:
            node = node[name]
        if where is not None:
            hits = [r for r in node if all(str(r.get(k)) == v for k, v in where.items())]
            if len(hits) != 1:
                raise KeyError(f"{key!r}: {len(hits)} rows match {where}")
            node = hits[0]
    return float(node)


def compare(checks: Sequence[Dict], result: Any, seeds: Sequence[int], entry_seeds: Sequence[int]
            ) -> Tuple[List[List[str]], bool]:
    """Rows ``number | recorded | now | tolerance | ok`` and whether every check is within its tolerance.

    A check's ``recorded`` is a number (for the entry's own seeds) or a mapping seed -> number, with ``{i}`` in its
    ``key`` standing for that seed's position in the run; a number recorded for other seeds than the run's is an
    error row, never a pass.
    """
    rows, ok_all = [], True
    for c in checks:
        per_seed = isinstance(c["recorded"], dict)
        if per_seed:
            cases = [(f"{c['name']}, seed {s}", c["recorded"].get(s), c["key"].replace("{i}", str(i)))
                     for i, s in enumerate(seeds)]
        else:
            same = sorted(seeds) == sorted(entry_seeds)
            cases = [(c["name"], c["recorded"] if same else None, c["key"])]
        for label, recorded, key in cases:
            if recorded is None:
                ok, now_text = False, f"error: not recorded for seeds {list(seeds)}"
            else:
                try:
                    now = lookup(result, key)
                    ok = abs(now - float(recorded)) <= float(c["tolerance"]) + 1e-12
                    now_text = f"{now:.4f}"
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    ok, now_text = False, f"error: {e}"
            ok_all &= ok
            rows.append([label, "–" if recorded is None else f"{recorded}", now_text, f"±{c['tolerance']}",
                         "ok" if ok else "MISS"])
    return rows, ok_all


def run_entry(name: str, entry: Dict, seeds: Sequence[int]) -> Any:
    """Run the entry's script in this process (``experiments.<script>.main``) and return its result."""
    argv = [*entry["argv"], "--set", f"seeds=[{','.join(map(str, seeds))}]"]
    print(f"\n== {name}: python -m experiments.{entry['script']} {' '.join(argv)}", flush=True)
    return importlib.import_module(f"experiments.{entry['script']}").main(argv)


def select(entries: Dict[str, Dict], what: str) -> Dict[str, Dict]:
    """Entries named ``what``, or every entry of section ``what``."""
    if what in entries:
        return {what: entries[what]}
    picked = {n: e for n, e in entries.items() if e["section"] == what}
    if not picked:
        sections = sorted({e["section"] for e in entries.values()})
        raise SystemExit(f"unknown section or entry {what!r}; entries: {sorted(entries)}; sections: {sections}")
    return picked


DEFAULTS = dict(expected=str(EXPECTED))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", nargs="?", help="an entry of expected.yaml, or a RESULTS.md section (all its entries)")
    p.add_argument("--list", action="store_true", help="list the entries, their runtime or why they are skipped")
    p.add_argument("--seeds", type=int, nargs="+", help="replace the entries' seeds (numbers must be recorded)")
    add_config_args(p, quick="(no effect: each entry fixes its own configuration)",
                    out="write the comparison rows here (JSON)")
    args = p.parse_args(argv)
    cfg = config_from_args(args, DEFAULTS)  # keys: expected (the file of recorded numbers), seeds
    seeds_override = args.seeds or cfg.get("seeds")
    entries = load_expected(Path(cfg["expected"]))
    if args.list or not args.section:
        rows = [[n, e["section"], f"skipped: {e['skip']}" if "skip" in e else
                 f"seeds {e['seeds']}, {len(e['checks'])} checks, {e.get('runtime', '?')}"]
                for n, e in entries.items()]
        print(table(rows, ["entry", "RESULTS section", "what runs"]))
        return 0
    ok_all, report = True, {}
    for name, entry in select(entries, args.section).items():
        if "skip" in entry:
            print(f"\n== {name} (RESULTS.md section {entry['section']}): skipped: {entry['skip']}")
            report[name] = {"skipped": entry["skip"]}
            continue
        seeds = list(seeds_override or entry["seeds"])
        try:
            result = run_entry(name, entry, seeds)
        except Exception as e:  # a command that no longer runs is a miss, reported with the others
            print(f"\n{name}: the command failed: {type(e).__name__}: {e}")
            ok_all = False
            report[name] = {"seeds": seeds, "ok": False, "error": f"{type(e).__name__}: {e}"}
            continue
        rows, ok = compare(entry["checks"], result, seeds, entry["seeds"])
        print(f"\n{name} — RESULTS.md section {entry['section']}: {entry['cites']}")
        print(table(rows, ["number", "recorded", "now", "tolerance", "ok"]))
        ok_all &= ok
        report[name] = {"seeds": seeds, "ok": ok, "rows": rows}
    write_json(args.out, report)
    print("\nall within tolerance" if ok_all else "\nMISS: at least one number moved beyond its tolerance")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
