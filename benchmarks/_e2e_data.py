"""Binary sentiment splits of the VADER ICWSM-2014 movie-review sentences, for ``e2e_quality.py``.

Source: :func:`gelora.data.vader_movie_sentences` (10,605 sentence snippets of Pang and Lee's
movie-review data, each with the mean valence rating of 20+ people on [-4, 4]; MIT licence; inside the
source distribution of ``vaderSentiment==3.3.2`` on PyPI, fetched once with pip into the gelora cache
and checked against its published SHA-256). That loader gives the texts and the mean ratings; here:

* the label is the sign of the mean rating: 1 (positive) when > 0, 0 (negative) when < 0; the 37
  sentences rated exactly 0 are dropped (10,568 remain: 5,242 positive, 5,326 negative);
* one seeded permutation splits them into test, validation and train (test and validation first, so
  that their sizes are fixed and the train split takes the rest); the splits do not depend on the
  training seed, only on ``split_seed``;
* ``limit`` takes a seeded subset first (for smoke runs); the split sizes then shrink in proportion
  (to the shares they have of the 10,568 labelled sentences of the published corpus).

:func:`binary_splits` returns the three splits and a JSON-ready provenance record (source, licence,
citation, counts, split sizes, label balance per split, seeds).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from gelora.data import DataUnavailable, vader_movie_sentences

__all__ = ["DataUnavailable", "Split", "binary_splits"]

#: Labelled (non-zero-rated) sentences of the published corpus: 10,605 minus 37 rated exactly 0.
N_LABELLED = 10_568


@dataclass
class Split:
    """Texts with binary labels (0 negative, 1 positive) and the mean rating each label comes from."""

    texts: List[str]
    labels: List[int]
    ratings: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts for {len(self.labels)} labels")
        if any(y not in (0, 1) for y in self.labels):
            raise ValueError("labels must be 0 or 1")

    def __len__(self) -> int:
        return len(self.texts)

    def balance(self) -> Dict[str, Any]:
        pos = sum(self.labels)
        n = len(self.labels)
        return {"n": n, "positive": pos, "negative": n - pos, "positive_share": round(pos / n, 4) if n else None}


def binary_splits(
    *,
    n_test: int = 2000,
    n_val: int = 1000,
    split_seed: int = 0,
    limit: Optional[int] = None,
    cache: Union[None, str, Path] = None,
    download: bool = True,
) -> Dict[str, Any]:
    """Train / validation / test splits of the VADER movie sentences with sign-of-rating labels.

    Args:
        n_test, n_val: test and validation sizes on the full corpus (with ``limit``, scaled by
            ``limit / 10,568``, the share they have of the published corpus, and at least 2 each).
        split_seed: seed of the permutation (and of the ``limit`` subset).
        limit: keep a seeded subset of this many labelled sentences first (smoke runs).
        cache, download: passed to :func:`gelora.data.vader_movie_sentences`.

    Returns:
        ``{"train": Split, "validation": Split, "test": Split, "provenance": dict}``.

    Raises:
        DataUnavailable: the corpus is neither cached nor downloadable.
        ValueError: sizes that leave fewer than 2 training sentences.
    """
    corpus = vader_movie_sentences(cache=cache, download=download)
    rows = [(t, r) for t, r in zip(corpus.texts, corpus.labels or []) if r != 0.0]
    n_zero = len(corpus.texts) - len(rows)
    rng = random.Random(split_seed)
    n_labelled = len(rows)
    if limit is not None:
        if limit < 6:
            raise ValueError(f"limit must be at least 6, got {limit}")
        rows = rng.sample(rows, min(limit, len(rows)))
        frac = len(rows) / N_LABELLED
        n_test = max(2, round(n_test * frac))
        n_val = max(2, round(n_val * frac))
    else:
        rows = list(rows)
    if n_test < 1 or n_val < 1 or len(rows) - n_test - n_val < 2:
        raise ValueError(f"{len(rows)} sentences cannot give {n_test} test, {n_val} validation and >= 2 train")
    rng.shuffle(rows)

    def mk(part):
        return Split([t for t, _ in part], [1 if r > 0 else 0 for _, r in part], [r for _, r in part])

    test, val, train = mk(rows[:n_test]), mk(rows[n_test:n_test + n_val]), mk(rows[n_test + n_val:])
    prov = {k: v for k, v in corpus.provenance.items() if k != "extracted"}
    prov.update(
        label_rule="1 if mean rating > 0, 0 if < 0; rating == 0 dropped",
        n_zero_rated_dropped=n_zero,
        n_labelled=n_labelled,
        limit=limit,
        split_seed=split_seed,
        splits={"train": train.balance(), "validation": val.balance(), "test": test.balance()},
    )
    return {"train": train, "validation": val, "test": test, "provenance": prov}
