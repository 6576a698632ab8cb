"""Layer-wise intrinsic-dimension profile of a transformers model.

:func:`profile_model` runs a model over a text corpus (or pre-tokenised batches) and estimates, with
:func:`gelora.twonn` (or :func:`gelora.gride` at one neighbour order, :mod:`gelora.profiling.scales`), the
intrinsic dimension (ID) of the hidden states entering and leaving every transformer block. Layer indices follow the ``output_hidden_states`` convention of transformers:
index 0 is the input of block 0 (the embeddings), index ``i + 1`` the output of block ``i``; a model
with L blocks gives L + 1 IDs. (For decoders whose base model applies a final norm, transformers'
last ``hidden_states`` entry is the *normed* output of the last block; the profile keeps the raw block
output, the representation that an adapter in the last block changes.)

How states are collected
------------------------
* Forward hooks on the blocks (a pre-hook on block 0 for the embeddings); they are removed in a
  ``finally`` block, the model runs under ``torch.no_grad`` in eval mode and every module's
  ``training`` flag is restored afterwards.
* Padding never enters the estimate: points are taken through the attention mask. ``pooling``
  picks what a point is: ``"tokens"`` (every non-padding token), ``"mean"`` (the masked mean of a
  sequence), ``"cls"`` (its first non-padding token, BERT's ``[CLS]``) or ``"last"`` (its last
  non-padding token, the usual sentence summary of a decoder).
* Memory is bounded by ``max_tokens`` points per layer, not by the data: every point gets an i.i.d.
  uniform key from a seeded generator and each layer keeps the ``max_tokens`` points with the
  smallest keys (bottom-k reservoir sampling, a uniform sample without replacement of everything
  seen). The keys are drawn before the forward pass, so a hook copies to the host only the rows that
  enter the sample, and all layers keep the *same* tokens: the layer-to-layer ID differences that
  drive the rank rule are then measured on paired samples.
* Samples are stored on the host in half precision: the model's dtype when it is float16/bfloat16,
  else float16 (a layer whose values overflow float16 is kept in float32 instead).
* A background thread receives the device-to-host copies (pinned buffers and CUDA events on a GPU)
  and writes them into the samples while the next batches run. With ``estimate_every=k`` a second
  thread estimates the layer IDs every k batches on a copy of the sample so far (on a side CUDA
  stream when the estimates run on a GPU) while the forward passes go on
  (``ProfileResult.history``), so a long run shows whether its estimates have settled. One such
  estimate runs at a time: if the previous one is still running when the next is due, the loop waits
  for it, so choose k so that an estimate takes less than k batches. The copy costs the layer samples'
  memory once more while it lives.
* Models dispatched by accelerate (``device_map="auto"``, CPU or disk offload) work unchanged: the
  hooks see each block's output on its execution device.

Per-module profiles
-------------------
``modules=`` (PEFT ``target_modules`` syntax, see
:func:`gelora.profiling.structure.resolve_target_modules`) additionally
profiles the input and the output of each such linear module inside the blocks (modules that receive
the very same input tensor, such as q/k/v, share one sample), for per-module rank allocation with
:func:`gelora.ranks.allocate_ranks`.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..id.dedup import unique_rows
from ..id.estimate import ESTIMATORS, TwoNNResult
from ..id.paired import twonn_rows
from ..id.twonn import twonn
from .contexts import CONTEXTS, is_causal, token_keys
from .hooks import POOLINGS, BatchSelection, Profiler
from .results import BOOTSTRAP_UNITS, ModuleProfile, PairedBootstrap, ProfileResult, ScaleCurve
from .scales import GRIDE, GrideProfile, check_scale, estimate_gride
from .sampler import make_batches
from .structure import TargetSpec, find_blocks, input_device, resolve_target_modules

#: Batches whose host copies may be in flight at once before the loop waits for the writer thread.
_MAX_IN_FLIGHT = 2


def _estimate(x: torch.Tensor, device: torch.device, what: str, rows: bool = False, **kw: Any) -> Any:
    """The TwoNN result of one sample; with ``rows=True`` ``(result, log_mu)``, the ratios in slot order
    (:func:`gelora.id.paired.twonn_rows`; ``log_mu`` is None for a 0-dimensional set)."""
    if x.numel() == 0 or x.shape[0] < 3:
        raise ValueError(f"{what}: only {x.shape[0] if x.dim() else 0} point(s) collected; TwoNN needs at least 3")
    try:
        if rows:
            return twonn_rows(x.to(device), **kw)
        return twonn(x.to(device), **kw)
    except ValueError as exc:
        keep, n_dup = unique_rows(x)
        if keep.numel() >= 3:
            raise ValueError(f"{what}: {exc}") from exc
    # One or two distinct points (e.g. the [CLS] embedding of every sequence): a 0-dimensional set.
    # The warning points at the caller of profile_model (_estimate <- _estimate_samples <- profile_model).
    warnings.warn(f"{what}: the {x.shape[0]} sampled points are {keep.numel()} distinct point(s); "
                  "its intrinsic dimension is reported as 0", stacklevel=4)
    res = TwoNNResult(id=0.0, stderr=0.0, n_points=int(x.shape[0]), n_used=0, n_duplicates=int(n_dup),
                      estimator=str(kw.get("estimator", "mle")), backend="none",
                      discard_fraction=float(kw.get("discard_fraction", 0.1)))
    return (res, None) if rows else res


def _check_arguments(*, pooling: str, max_tokens: Any, estimator: str, estimate_every: int, paired_bootstrap: Any,
                     bootstrap_unit: str, store_dtype: Optional[torch.dtype], contexts: str, scale: Any,
                     range_max: Any, bootstrap: int) -> None:
    """Raises ValueError for an argument of :func:`profile_model` out of its range."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(max_tokens, int) or max_tokens < 3:
        raise ValueError(f"max_tokens must be an integer >= 3, got {max_tokens!r}")
    if estimator not in ESTIMATORS + (GRIDE,):
        raise ValueError(f"estimator must be one of {ESTIMATORS + (GRIDE,)}, got {estimator!r}")
    check_scale(scale, range_max, estimator)
    if estimator == GRIDE and bootstrap:
        raise ValueError(f"bootstrap={bootstrap} is TwoNN's own bootstrap; a GRIDE profile's errors come from "
                         "the paired bootstrap (paired_bootstrap=N)")
    if estimate_every < 0:
        raise ValueError(f"estimate_every must be >= 0, got {estimate_every}")
    if isinstance(paired_bootstrap, bool) or not isinstance(paired_bootstrap, int) or paired_bootstrap < 0 \
            or paired_bootstrap == 1:
        raise ValueError(f"paired_bootstrap must be 0 (none) or a number of replicates >= 2, got {paired_bootstrap!r}")
    if bootstrap_unit not in BOOTSTRAP_UNITS:
        raise ValueError(f"bootstrap_unit must be one of {BOOTSTRAP_UNITS}, got {bootstrap_unit!r}")
    if contexts not in CONTEXTS:
        raise ValueError(f"contexts must be one of {CONTEXTS}, got {contexts!r}")
    if store_dtype is not None and store_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"store_dtype must be float16, bfloat16 or float32, got {store_dtype}")


def _placement(
    model: nn.Module, blocks: nn.ModuleList, id_device: Union[None, str, torch.device]
) -> Tuple[nn.Module, torch.device, torch.device]:
    """The module to call (a task wrapper's base model when it holds the blocks, so that no logits are
    computed), the device of the input ids and the device of the estimates."""
    runner = getattr(model, "base_model", model)
    if not isinstance(runner, nn.Module) or not any(m is blocks for m in runner.modules()):
        runner = model
    in_dev = input_device(model)
    if id_device is None:
        id_dev = in_dev if in_dev.type == "cuda" else torch.device("cpu")
    else:
        id_dev = torch.device(id_device)
    return runner, in_dev, id_dev


def _forward_kwargs(model: nn.Module, forward_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The keyword arguments of every forward call: ``forward_kwargs`` and ``use_cache=False`` where the
    model has a cache (nothing is generated)."""
    fkw = dict(forward_kwargs or {})
    cfg = getattr(model, "config", None)
    if getattr(cfg, "use_cache", None) is not None and "use_cache" not in fkw:
        fkw["use_cache"] = False
    return fkw


@dataclass
class _Run:
    """One profile: the model, the module called, the profiler, where inputs and estimates go, the
    estimator's arguments; the stages add the sequences run and their seconds to :attr:`timings`."""

    model: nn.Module
    runner: nn.Module
    prof: Profiler
    in_dev: torch.device
    id_dev: torch.device
    forward_kwargs: Dict[str, Any]
    est_kw: Dict[str, Any]
    #: context keys of the tokens: True prefix (causal model), False whole sequence, None no keys
    causal: Optional[bool] = None
    #: GRIDE profiles: the largest n2 of the curves, the order asked for (None: the plateau), the estimates
    gride_kw: Optional[Dict[str, Any]] = None
    gride: Optional[GrideProfile] = None
    n_seq: int = 0
    timings: Dict[str, float] = field(
        default_factory=lambda: {"forward": 0.0, "wait": 0.0, "estimate": 0.0, "bootstrap": 0.0})


class _Snapshots:
    """Background estimates every ``every`` batches (:attr:`ProfileResult.history`): the writer thread
    copies the layer samples, in order after the writes of the batches before, and the estimator thread
    estimates the copy (on a side CUDA stream when the estimates run on a GPU) while the forward passes
    go on. One estimate at a time: a due snapshot waits for the previous one."""

    def __init__(self, run: _Run, every: int) -> None:
        self.run, self.every = run, every
        self.history: List[Dict[str, Any]] = []
        self.side_stream = torch.cuda.Stream(device=run.id_dev) if run.id_dev.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gelora-estimate")
        self.last: Optional[Future] = None

    def _clone_layers(self) -> List[torch.Tensor]:
        # runs on the writer thread, in order after the writes of the batches before it
        prof = self.run.prof
        return [prof.stores[k].points().clone() for k in prof.layer_keys]

    def _estimate(self, batch_no: int, n_seen: int, clone: Future) -> None:
        # runs on the estimator thread while the writer and the forward passes go on
        xs = clone.result()
        ctx = torch.cuda.stream(self.side_stream) if self.side_stream is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            if self.run.gride_kw is not None:
                entry = _gride_snapshot(self.run, xs)
            else:
                entry = {"ids": [_estimate(x, self.run.id_dev, f"layer {i}", **self.run.est_kw).id
                                 if x.shape[0] >= 3 else float("nan") for i, x in enumerate(xs)]}
        self.history.append({"batch": batch_no, "n_seen": n_seen, **entry})

    def after_batch(self, batch_no: int, writer: ThreadPoolExecutor) -> None:
        if not self.every or batch_no % self.every != 0:
            return
        if self.last is not None:  # one estimate at a time: wait for the previous one
            self.last.result()
        clone = writer.submit(self._clone_layers)
        self.last = self.pool.submit(self._estimate, batch_no, self.run.prof.sampler.n_seen, clone)

    def wait(self) -> None:
        if self.last is not None:
            self.last.result()

    def postfix(self, n_seen: int) -> Dict[str, Any]:
        """The progress bar's postfix: points seen and the mean ID of the latest snapshot."""
        post: Dict[str, Any] = {"points": n_seen}
        if self.history:
            post["mean ID"] = f"{sum(self.history[-1]['ids']) / len(self.history[-1]['ids']):.1f}"
        return post


def _gride_snapshot(run: _Run, xs: List[torch.Tensor]) -> Dict[str, Any]:
    """A background GRIDE estimate of the layers: their IDs at the order asked for, or at the plateau of
    this snapshot's curves (``"n1"`` says which); NaN for all while a layer holds fewer than 3 points."""
    if any(x.shape[0] < 3 for x in xs):
        return {"ids": [float("nan")] * len(xs), "n1": None}
    keys = [f"layer{i}" for i in range(len(xs))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 0-dimensional layers warn once, in the final estimate
            g = estimate_gride(dict(zip(keys, xs)), keys, device=run.id_dev, rows=False, **run.gride_kw)
    except ValueError:  # too few points yet for the order asked for
        return {"ids": [float("nan")] * len(xs), "n1": run.gride_kw["scale"]}
    return {"ids": [g.results[k].id for k in keys], "n1": g.n1}


def _forward(run: _Run, batch: Dict[str, Any], writer: ThreadPoolExecutor) -> Future:
    """Run one batch through the model with the hooks selecting its sampled rows; the writer thread stores
    them (the returned future)."""
    prof = run.prof
    mask = batch["attention_mask"]
    keys = None if run.causal is None else token_keys(
        batch["input_ids"], mask, causal=run.causal, token_type_ids=batch.get("token_type_ids"))
    sel = BatchSelection(mask, prof.pooling, prof.sampler, keys)
    prof.batch = sel
    prof.pending = []
    inputs = {k: (v.to(run.in_dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    run.runner(**inputs, **run.forward_kwargs)
    prof.first_batch = False
    pending, prof.pending, prof.batch = prof.pending, [], None
    written = writer.submit(prof.write, pending, sel.slots)
    prof.slot_seq[sel.slots] = run.n_seq + sel.seq
    run.n_seq += int(mask.shape[0])
    return written


def _collect(run: _Run, batches: Iterable[Dict[str, Any]], n_batches: Optional[int], *, estimate_every: int,
             progress: bool) -> List[Dict[str, Any]]:
    """Run every batch with the hooks installed (eval mode, no grad), then restore the hooks and every
    module's ``training`` flag. Returns the background snapshots (``ProfileResult.history``).

    Raises:
        ValueError: the data held no non-padding token.
    """
    from tqdm.auto import tqdm

    prof, t = run.prof, run.timings
    flags = [(m, m.training) for m in run.model.modules()]
    snaps = _Snapshots(run, estimate_every)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gelora-writer")
    futures: List[Future] = []
    bar = tqdm(total=n_batches, desc="gelora profile", unit="batch", disable=not progress, leave=False)
    try:
        run.model.eval()
        prof.install()
        with torch.no_grad():
            for b_no, batch in enumerate(batches, start=1):
                t0 = time.perf_counter()
                futures.append(_forward(run, batch, writer))
                t1 = time.perf_counter()
                t["forward"] += t1 - t0
                snaps.after_batch(b_no, writer)
                while len(futures) > _MAX_IN_FLIGHT:
                    futures.pop(0).result()
                t["wait"] += time.perf_counter() - t1
                bar.update(1)
                bar.set_postfix(snaps.postfix(prof.sampler.n_seen), refresh=False)
            t1 = time.perf_counter()
            for f in futures:
                f.result()
            futures.clear()
            snaps.wait()
            t["wait"] += time.perf_counter() - t1
    finally:
        bar.close()
        prof.remove()
        prof.batch = None
        for f in futures:
            f.cancel()
        writer.shutdown(wait=True)
        snaps.pool.shutdown(wait=True)
        for m, flag in flags:
            m.training = flag
    if prof.sampler.n_seen == 0:
        raise ValueError("the data contained no non-padding tokens")
    return snaps.history


def _estimate_samples(
    run: _Run, *, rows: bool, progress: bool
) -> Tuple[List[str], Dict[str, TwoNNResult], Dict[str, Optional[torch.Tensor]]]:
    """The TwoNN result of every sample: the layers, then the module inputs and outputs that hold points;
    with ``rows=True`` also their ratios in slot order (for the paired bootstrap). A GRIDE profile gives
    each sample's estimate at the profile's neighbour order (:mod:`gelora.profiling.scales`; the
    curves and the choice in ``run.gride``)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    prof = run.prof
    keys = list(prof.layer_keys)
    if prof.modules:
        keys += [k for k in prof.stores if k.startswith(("in:", "out:")) and prof.stores[k].n > 0]
    if run.gride_kw is not None:
        with torch.no_grad():
            run.gride = estimate_gride(
                {k: prof.stores[k].points() for k in keys}, prof.layer_keys, device=run.id_dev, rows=rows,
                names={k: f"layer {k[5:]}" if k.startswith("layer") else k for k in keys},
                progress=lambda ks: tqdm(ks, desc="gelora GRIDE", unit="set", disable=not progress, leave=False),
                **run.gride_kw)
        run.timings["estimate"] = time.perf_counter() - t0
        return keys, dict(run.gride.results), dict(run.gride.log_mu)
    results: Dict[str, TwoNNResult] = {}
    log_mu: Dict[str, Optional[torch.Tensor]] = {}
    with torch.no_grad():
        for k in tqdm(keys, desc="gelora TwoNN", unit="set", disable=not progress, leave=False):
            what = f"layer {k[5:]}" if k.startswith("layer") else k
            if rows:
                results[k], log_mu[k] = _estimate(prof.stores[k].points(), run.id_dev, what, rows=True, **run.est_kw)
            else:
                results[k] = _estimate(prof.stores[k].points(), run.id_dev, what, **run.est_kw)
    run.timings["estimate"] = time.perf_counter() - t0
    return keys, results, log_mu


def _paired_bootstrap(run: _Run, keys: List[str], log_mu: Dict[str, Optional[torch.Tensor]], *, n_boot: int,
                      unit: str) -> PairedBootstrap:
    """The paired bootstrap of every ID (``keys``) from the samples' row-aligned ratios, already run."""
    t0 = time.perf_counter()
    prof = run.prof
    n_rows = prof.stores[keys[0]].n
    if any(prof.stores[k].n != n_rows for k in keys):
        raise RuntimeError("internal: the samples of the layers hold different numbers of slots")
    lm = torch.stack([log_mu[k] if log_mu[k] is not None
                      else torch.full((n_rows,), float("nan"), dtype=torch.float64) for k in keys])
    g = run.gride
    paired = PairedBootstrap(keys=keys, log_mu=lm, groups=prof.slot_seq[:n_rows].clone(),
                             fixed={k: 0.0 for k in keys if log_mu[k] is None}, unit=unit,
                             n_boot=n_boot, seed=run.est_kw["seed"], estimator=run.est_kw["estimator"],
                             discard_fraction=run.est_kw["discard_fraction"], n1=None if g is None else g.n1,
                             start=None if g is None else [g.results[k].id for k in keys])
    paired.run()
    run.timings["bootstrap"] = time.perf_counter() - t0
    return paired


def _module_profiles(prof: Profiler, results: Dict[str, Any]) -> Dict[str, ModuleProfile]:
    """The input and output IDs of every profiled linear module, by full module name (and their GRIDE
    curves in a GRIDE profile)."""
    out: Dict[str, ModuleProfile] = {}
    for tm in prof.modules:
        rin = results[prof.mod_in_key.get(tm.name, f"in:{tm.name}")]
        rout = results[f"out:{tm.name}"]
        curves = [ScaleCurve.from_gride(r.curve) if hasattr(r, "curve") else None for r in (rin, rout)]
        out[tm.name] = ModuleProfile(
            name=tm.name, block=tm.block, rel=tm.rel, in_features=tm.in_features, out_features=tm.out_features,
            id_in=rin.id, stderr_in=rin.stderr, id_out=rout.id, stderr_out=rout.stderr,
            n_points=rout.n_points, input_shared_with=prof.shared.get(tm.name), curve_in=curves[0], curve_out=curves[1],
        )
    return out


def _result(run: _Run, results: Dict[str, Any], paired: Optional[PairedBootstrap],
            history: List[Dict[str, Any]], *, t_start: float, keep_samples: bool) -> ProfileResult:
    """The :class:`ProfileResult` of a finished run."""
    prof = run.prof
    layer_res = [results[k] for k in prof.layer_keys]
    mod_profiles = _module_profiles(prof, results)
    total = time.perf_counter() - t_start
    n_seen = prof.sampler.n_seen
    t = run.timings
    cfg = getattr(run.model, "config", None)
    return ProfileResult(
        layers=["embeddings"] + [f"block {i}" for i in range(len(prof.blocks))],
        ids=[r.id for r in layer_res],
        stderr=[r.stderr for r in layer_res],
        n_points=[r.n_points for r in layer_res],
        n_duplicates=[r.n_duplicates for r in layer_res],
        n_seen=n_seen,
        n_repeats=prof.sampler.n_repeats,
        contexts="none" if run.causal is None else ("prefix" if run.causal else "sequence"),
        n_sequences=run.n_seq,
        pooling=prof.pooling,
        max_tokens=prof.sampler.capacity,
        seed=run.est_kw["seed"],
        estimator=run.est_kw["estimator"],
        blocks_path=prof.blocks_path,
        store_dtypes=[str(prof.stores[k].buf.dtype).replace("torch.", "") if prof.stores[k].buf is not None
                      else "none" for k in prof.layer_keys],
        host_bytes=sum(s.nbytes for s in prof.stores.values()),
        modules=mod_profiles,
        timings={**t, "total": total, "points_per_s": n_seen / max(t["forward"] + t["wait"], 1e-9)},
        history=history,
        samples=[prof.stores[k].points() for k in prof.layer_keys] if keep_samples else None,
        model_name=str(getattr(cfg, "_name_or_path", "") or type(run.model).__name__),
        twonn=[] if run.gride else layer_res,
        paired=paired,
        **_gride_fields(run),
    )


def _gride_fields(run: _Run) -> Dict[str, Any]:
    """The GRIDE attributes of :class:`ProfileResult` (none for a TwoNN profile)."""
    g = run.gride
    if g is None:
        return {}
    layers = [g.results[k].curve for k in run.prof.layer_keys]
    return dict(scale=g.n1, scale_choice=g.choice, range_max=run.gride_kw["range_max"], plateau_scores=g.scores,
                curves=[ScaleCurve.from_gride(c) for c in layers], gride=layers)


def profile_model(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    max_tokens: int = 10_000,
    pooling: str = "tokens",
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    modules: TargetSpec = None,
    blocks: Optional[str] = None,
    store_dtype: Optional[torch.dtype] = None,
    estimator: str = "mle",
    discard_fraction: float = 0.1,
    bootstrap: int = 0,
    backend: Optional[str] = None,
    id_device: Union[None, str, torch.device] = None,
    estimate_every: int = 0,
    progress: bool = True,
    forward_kwargs: Optional[Dict[str, Any]] = None,
    keep_samples: bool = False,
    paired_bootstrap: int = 1000,
    bootstrap_unit: str = "sequence",
    contexts: str = "auto",
    scale: Optional[int] = None,
    range_max: int = 64,
) -> ProfileResult:
    """Estimate the intrinsic dimension of the hidden states entering and leaving every block.

    Args:
        model: a transformers model (encoder or decoder; a ``*ForCausalLM``/``*ForSequenceClassification``
            wrapper runs its base model, so no vocabulary-sized logits are computed). It may be
            dispatched by accelerate (``device_map="auto"``, offloading) and be in bfloat16.
        data: texts (with ``tokenizer``), a (B, T) tensor of ids, a ``BatchEncoding``, or an iterable
            of batches; see :func:`make_batches`.
        tokenizer: needed for texts.
        max_tokens: sample size per layer (points kept; memory is ``(L + 1) * max_tokens * D`` half
            floats on the host).
        pooling: ``"tokens"``, ``"mean"``, ``"cls"`` or ``"last"`` (see the module docstring).
        batch_size, max_length: batching and truncation of texts.
        seed: seed of the sampler (and of the bootstrap).
        modules: also profile the input and output of these linear modules (``target_modules`` syntax,
            ``"all-linear"`` for all of them); ``None``: blocks only.
        blocks: path of the block ``ModuleList`` when it is not found automatically.
        store_dtype: host dtype of the samples (default: the model's half dtype, else float16).
        estimator: a TwoNN estimator (``"mle"``, ``"linear"``, ``"mle_censored"``), passed with
            ``discard_fraction``, ``bootstrap`` and ``backend`` to :func:`gelora.twonn`; or ``"gride"``:
            :func:`gelora.gride` of every sample (``range_max``, ``backend``), every ID read at the one
            neighbour order ``scale`` (:mod:`gelora.profiling.scales`; ``discard_fraction`` unused,
            ``bootstrap`` must be 0).
        id_device: where the estimates run (default: the model's CUDA device if it has one, else CPU).
        estimate_every: estimate the layer IDs in the background every this many batches (0: never).
        progress: show tqdm progress bars.
        forward_kwargs: extra keyword arguments for every forward call.
        keep_samples: keep the sampled points of every layer in ``ProfileResult.samples``.
        paired_bootstrap: replicates of the paired bootstrap of all the IDs (``ProfileResult.paired``,
            see :mod:`gelora.id.paired`; 0: none). The estimates then keep their ratios in slot order
            and go through :func:`gelora.id.paired.twonn_rows` (same IDs and ``n_fixed``).
        bootstrap_unit: what a replicate resamples: ``"sequence"`` (every sampled point of a drawn
            sequence; tokens of one sequence are not independent) or ``"token"`` (points one by one).
            The same for pooled points (one point per sequence).
        contexts: which tokens are one point (:mod:`gelora.profiling.contexts`): ``"prefix"`` (tokens with
            the same prefix of ids: a causal model), ``"sequence"`` (the same whole sequence and
            position), ``"auto"`` (``"prefix"`` when every attention module of the model is causal, else
            ``"sequence"``) or ``"none"`` (every token is its own point). The sample keeps one token per
            context: copies computed in batches of different shapes differ by rounding only and would
            enter TwoNN as near-duplicates with ratios of up to 1e7.
        scale: GRIDE only: the neighbour order ``n1`` (a power of two, ``2 * scale <= range_max``) of every
            ID; None (default): the plateau of the layer curves, the same order for all
            (:func:`gelora.profiling.scales.plateau`). ``ProfileResult.curves`` keeps the whole curves.
        range_max: GRIDE only: the largest ``n2`` of the curves (neighbours searched per point).

    Returns:
        :class:`ProfileResult`.

    Raises:
        ValueError: bad arguments (a ``scale`` with a TwoNN estimator, not a power of two or beyond the
            curve among them), no data, too few points in a layer (or to reach ``scale``).
    """
    _check_arguments(pooling=pooling, max_tokens=max_tokens, estimator=estimator, estimate_every=estimate_every,
                     paired_bootstrap=paired_bootstrap, bootstrap_unit=bootstrap_unit, store_dtype=store_dtype,
                     contexts=contexts, scale=scale, range_max=range_max, bootstrap=bootstrap)
    t_start = time.perf_counter()
    blocks_path, ml = find_blocks(model, blocks)
    targets = resolve_target_modules(model, modules, blocks=blocks) if modules is not None else None
    runner, in_dev, id_dev = _placement(model, ml, id_device)
    batches, n_batches, _ = make_batches(data, tokenizer, batch_size=batch_size, max_length=max_length)
    prof = Profiler(model, max_tokens=max_tokens, pooling=pooling, seed=seed, store_dtype=store_dtype,
                    modules=targets, blocks_path=blocks_path, blocks=ml)
    est_kw = dict(estimator=estimator, discard_fraction=discard_fraction, bootstrap=bootstrap, seed=seed,
                  backend=backend)
    causal = None if contexts == "none" else (is_causal(model) if contexts == "auto" else contexts == "prefix")
    run = _Run(model, runner, prof, in_dev, id_dev, _forward_kwargs(model, forward_kwargs), est_kw, causal,
               gride_kw=dict(range_max=int(range_max), scale=scale, backend=backend) if estimator == GRIDE else None)
    history = _collect(run, batches, n_batches, estimate_every=estimate_every, progress=progress)
    keys, results, log_mu = _estimate_samples(run, rows=bool(paired_bootstrap), progress=progress)
    paired = _paired_bootstrap(run, keys, log_mu, n_boot=paired_bootstrap, unit=bootstrap_unit) \
        if paired_bootstrap else None
    return _result(run, results, paired, history, t_start=t_start, keep_samples=keep_samples)
