"""The tasks of the suite: what is learnt, from which data, with which fixed splits and metrics.

==============  =====================================================  ==========================
task            data (see ``sources``)                                 metrics (first: selection)
==============  =====================================================  ==========================
snli            SNLI 1.0 sentence pairs, 3 classes (entailment,        accuracy, macro-F1
                neutral, contradiction); the GLUE MNLI stand-in
vader_movie     VADER movie-review sentences, sign of the mean         accuracy, macro-F1
                rating (zero-rated dropped); the SST-2 stand-in
vader_ratings   all four VADER sentence sets, the mean rating / 4      Pearson, Spearman, RMSE
                as a regression target; the STS-B stand-in
==============  =====================================================  ==========================

Splits are fixed by ``split_seed`` alone (never by the training seed):

* ``snli``: a seeded sample of ``n_train`` (20,000) pairs and, disjoint from it, ``n_val`` (1,000)
  validation pairs from the 99,890 labelled training pairs; ``n_test`` (2,000) pairs sampled from the
  official test set (9,824). 20,000 pairs are more than the 2,000 steps x 16 of the longest pilot see
  in two epochs, so the training subset is not what limits convergence on a 2-core CPU.
* ``vader_movie``: :func:`_e2e_data.binary_splits` (test 2,000, validation 1,000, train 7,568): the
  splits of ``benchmarks/e2e_quality.py``.
* ``vader_ratings``: one seeded permutation of the 23,703 sentences of the four sets: test 2,000,
  validation 1,000, train 20,703 (sets mixed).

Selection (learning rate, steps) uses the validation split only; the test split is read once per cell,
after training. ``limit`` keeps a seeded subset of that many examples first (smoke runs).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

Cache = Union[None, str, Path]


@dataclass
class Examples:
    """Texts (and second texts of pairs) with labels: class indices, or floats for regression."""

    texts: List[str]
    pairs: Optional[List[str]]
    labels: List[Any]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels) or (self.pairs is not None and len(self.pairs) != len(self.texts)):
            raise ValueError(f"{len(self.texts)} texts, {None if self.pairs is None else len(self.pairs)} pairs "
                             f"and {len(self.labels)} labels do not match")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, n: int) -> "Examples":
        return Examples(self.texts[:n], None if self.pairs is None else self.pairs[:n], self.labels[:n])


@dataclass(frozen=True)
class Task:
    """One task: its kind, head size, metrics (``metrics[0]`` selects), split sizes and loader."""

    name: str
    kind: str  # "classification" | "regression"
    n_outputs: int
    metrics: Sequence[str]
    about: str
    load: Callable[..., Dict[str, Any]] = field(repr=False)
    n_train: Optional[int] = None
    n_val: int = 1000
    n_test: int = 2000

    @property
    def primary(self) -> str:
        return self.metrics[0]

    def splits(self, *, split_seed: int = 0, limit: Optional[int] = None, cache: Cache = None,
               download: bool = True) -> Dict[str, Any]:
        """``{"train", "validation", "test": Examples, "provenance": dict}``."""
        if limit is not None and limit < 12:
            raise ValueError(f"limit must be at least 12, got {limit}")
        return self.load(self, split_seed=split_seed, limit=limit, cache=cache, download=download)


def _sizes(task: Task, n: int, limit: Optional[int]):
    """(n_test, n_val, n_train) for ``n`` examples (with ``limit``: shares of the limited set)."""
    if limit is None:
        n_test, n_val = task.n_test, task.n_val
        n_train = n - n_test - n_val if task.n_train is None else task.n_train
    else:
        n_test, n_val = max(2, limit // 4), max(2, limit // 6)
        n_train = limit - n_test - n_val
    if n_train < 2 or n_test + n_val + n_train > n:
        raise ValueError(f"{n} examples cannot give {n_test} test, {n_val} validation and {n_train} train")
    return n_test, n_val, n_train


def _snli(task: Task, *, split_seed, limit, cache, download) -> Dict[str, Any]:
    from .sources import snli_pairs

    data, prov = snli_pairs(cache, download=download)
    rng = random.Random(split_seed)
    n_test, n_val, n_train = _sizes(task, len(data["train"]), limit)
    train_pool = rng.sample(data["train"], n_val + n_train)
    test = rng.sample(data["test"], min(n_test, len(data["test"])))

    def mk(rows):
        return Examples([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])

    out = {"validation": mk(train_pool[:n_val]), "train": mk(train_pool[n_val:]), "test": mk(test)}
    prov.update(split_seed=split_seed, limit=limit, labels=["entailment", "neutral", "contradiction"],
                split_rule="train and validation: disjoint seeded samples of the training pairs; "
                           "test: a seeded sample of the official test set",
                splits={k: _class_counts(v, 3) for k, v in out.items()})
    return dict(out, provenance=prov)


def _vader_movie(task: Task, *, split_seed, limit, cache, download) -> Dict[str, Any]:
    from _e2e_data import binary_splits

    kw = {} if limit is None else {"limit": limit}
    d = binary_splits(n_test=task.n_test, n_val=task.n_val, split_seed=split_seed, cache=cache,
                      download=download, **kw)
    out = {k: Examples(d[k].texts, None, d[k].labels) for k in ("train", "validation", "test")}
    return dict(out, provenance=d["provenance"])


def _vader_ratings(task: Task, *, split_seed, limit, cache, download) -> Dict[str, Any]:
    from .sources import vader_rated_sentences

    rows, prov = vader_rated_sentences(cache, download=download)
    rng = random.Random(split_seed)
    rows = rng.sample(rows, limit) if limit is not None else list(rows)
    rng.shuffle(rows)
    n_test, n_val, _ = _sizes(task, len(rows), limit)

    def mk(part):  # the target is the mean rating / 4, in [-1, 1]
        return Examples([r[1] for r in part], None, [r[2] / 4.0 for r in part])

    out = {"test": mk(rows[:n_test]), "validation": mk(rows[n_test:n_test + n_val]),
           "train": mk(rows[n_test + n_val:])}
    prov.update(split_seed=split_seed, limit=limit, target="mean rating / 4 (in [-1, 1])",
                splits={k: {"n": len(v), "target_mean": round(sum(v.labels) / len(v), 4)} for k, v in out.items()})
    return dict(out, provenance=prov)


def _class_counts(ex: Examples, n: int) -> Dict[str, int]:
    return {"n": len(ex), **{f"class_{c}": sum(1 for y in ex.labels if y == c) for c in range(n)}}


TASKS: Dict[str, Task] = {
    "snli": Task("snli", "classification", 3, ("acc", "macro_f1"),
                 "SNLI 1.0 premise/hypothesis pairs, 3 classes", _snli, n_train=20_000),
    "vader_movie": Task("vader_movie", "classification", 2, ("acc", "macro_f1"),
                        "VADER movie-review sentences, sign of the mean rating", _vader_movie),
    "vader_ratings": Task("vader_ratings", "regression", 1, ("pearson", "spearman", "rmse"),
                          "VADER tweets, movie, Amazon and NYT sentences, mean rating / 4", _vader_ratings),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {sorted(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------
def _ranks(xs: Sequence[float]) -> List[float]:
    """Ranks 1..n, ties given their average rank (as scipy.stats.rankdata)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (NaN when either side is constant)."""
    n = len(x)
    if n != len(y) or n < 2:
        raise ValueError(f"pearson needs two equal sequences of >= 2 values, got {len(x)} and {len(y)}")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


def classification_metrics(pred: Sequence[int], gold: Sequence[int], n_classes: int) -> Dict[str, float]:
    """Accuracy and macro-F1 (mean over the ``n_classes`` classes of their F1; 0 for an absent class)."""
    acc = sum(int(p == y) for p, y in zip(pred, gold)) / len(gold)
    f1s = []
    for c in range(n_classes):
        tp = sum(1 for p, y in zip(pred, gold) if p == c and y == c)
        fp = sum(1 for p, y in zip(pred, gold) if p == c and y != c)
        fn = sum(1 for p, y in zip(pred, gold) if p != c and y == c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"acc": acc, "macro_f1": sum(f1s) / n_classes}


def regression_metrics(pred: Sequence[float], gold: Sequence[float]) -> Dict[str, float]:
    rmse = math.sqrt(sum((p - y) ** 2 for p, y in zip(pred, gold)) / len(gold))
    return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold), "rmse": rmse}


def task_metrics(task: Task, outputs: Sequence[Any], gold: Sequence[Any]) -> Dict[str, float]:
    """Metrics of model outputs (class indices, or predicted targets) against the labels."""
    if task.kind == "classification":
        return classification_metrics(outputs, gold, task.n_outputs)
    return regression_metrics(outputs, gold)
