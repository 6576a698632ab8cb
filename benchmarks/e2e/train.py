"""One cell's job: build the method's model, train it on the task with the cell's seed, evaluate it.

The same for every method: AdamW (no weight decay) on the trainable parameters, linear warm-up over
``warmup`` of the steps then linear decay to 0, gradient clipping at ``clip``, the encoder's own dropout
(0.1) on, float32, the seeded batch order of :func:`e2e_quality.batch_order` and the head initialised from the
seed (so every method of a seed sees the same batches and starts from the same head). AdaLoRA calls
``update_and_allocate`` after every optimiser step (timed apart from training).

A *pilot* cell (uniform LoRA at one learning rate) evaluates the validation split every ``eval_every``
steps and never reads the test split; a *main* cell evaluates validation and test once, after the last step.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional

_SPLITS: Dict[Any, Any] = {}


def load_encoded(task, opts: Dict[str, Any]) -> Dict[str, Any]:
    """The task's splits and their encodings (cached per process)."""
    from .model import encode

    key = (task.name, opts["split_seed"], opts["limit"], opts["max_length"], opts["cache"])
    if key not in _SPLITS:
        sp = task.splits(split_seed=opts["split_seed"], limit=opts["limit"], cache=opts["cache"],
                         download=opts["download"])
        enc = {k: encode(sp[k].texts, sp[k].pairs, opts["max_length"]) for k in ("train", "validation", "test")}
        _SPLITS[key] = {"splits": sp, "enc": enc}
    return _SPLITS[key]


def evaluate(model, task, data: Dict[str, Any], part: str, batch_size: int) -> Dict[str, float]:
    from .model import predict
    from .tasks import task_metrics

    out = predict(model, data["enc"][part], task.kind == "regression", batch_size)
    return task_metrics(task, out, data["splits"][part].labels)


def train(model, task, data: Dict[str, Any], *, steps: int, lr: float, seed: int, opts: Dict[str, Any],
          adalora: bool = False, every: int = 0, on_eval: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Train ``steps`` steps; ``on_eval(step)`` after every ``every`` steps and after the last one."""
    import torch

    from e2e_quality import batch_order  # the single-task benchmark's seeded order, the same batches

    from .model import collate

    regression = task.kind == "regression"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(round(opts["warmup"] * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    enc, y = data["enc"]["train"], data["splits"]["train"].labels
    losses: List[float] = []
    step_s: List[float] = []
    alloc_s = eval_s = 0.0
    model.train()
    t_all = time.perf_counter()
    for step, idx in enumerate(batch_order(len(enc), opts["batch_size"], steps, seed)):
        ts = time.perf_counter()
        out = model(**collate([enc[i] for i in idx], [y[i] for i in idx], regression))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opts["clip"])
        opt.step()
        sched.step()
        if adalora:
            ta = time.perf_counter()
            model.base_model.update_and_allocate(step)
            alloc_s += time.perf_counter() - ta
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        step_s.append(time.perf_counter() - ts)
        if on_eval is not None and ((every and (step + 1) % every == 0) or step + 1 == steps):
            te = time.perf_counter()
            on_eval(step + 1)
            eval_s += time.perf_counter() - te
    return {"losses": losses, "train_s": time.perf_counter() - t_all - alloc_s - eval_s, "alloc_s": alloc_s,
            "step_s_median": statistics.median(step_s), "eval_during_s": eval_s}


def _param_record(model, method: str, names: List[str]) -> Dict[str, Any]:
    from e2e_quality import count_params, effective_lora_params, module_ranks

    p = count_params(model)
    ranks = module_ranks(model, names) if method != "head" else {}
    eff = effective_lora_params(model, ranks, method == "adalora") if method != "head" else 0
    return {"ranks": ranks, "lora_params_trainable": p["lora"], "lora_params_effective": eff,
            "head_params": p["head"], "other_trainable": p["other_trainable"]}


def run_cell(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run one cell (``spec``: phase, task, budget, method, seed, lr, steps, alloc, opts); the record's
    metrics, ranks and costs (peak RSS: ``VmHWM`` since the start of the cell)."""
    from e2e_quality import peak_rss_mib, reset_peak_rss, rss_mib

    from .methods import build
    from .tasks import get_task

    reset_peak_rss()
    t0 = time.perf_counter()
    task, opts, method = get_task(spec["task"]), spec["opts"], spec["method"]
    data = load_encoded(task, opts)
    t1 = time.perf_counter()
    model, names = build(method, task, spec["seed"], spec["budget"], spec.get("alloc"), spec["steps"], opts)
    setup_s = time.perf_counter() - t1
    rss_base = rss_mib()
    ranks_start = _param_record(model, method, names)["ranks"] if method == "adalora" else None
    curve: List[Dict[str, Any]] = []
    pilot = spec["phase"] == "pilot"

    def on_eval(step: int) -> None:
        if pilot:
            curve.append({"step": step, **evaluate(model, task, data, "validation", opts["eval_batch_size"])})

    tr = train(model, task, data, steps=spec["steps"], lr=spec["lr"], seed=spec["seed"], opts=opts,
               adalora=method == "adalora", every=spec.get("eval_every", 0) if pilot else 0, on_eval=on_eval)
    rec: Dict[str, Any] = {"curve": curve} if pilot else {}
    te = time.perf_counter()
    if not pilot:
        rec["val"] = evaluate(model, task, data, "validation", opts["eval_batch_size"])
        rec["test"] = evaluate(model, task, data, "test", opts["eval_batch_size"])
    k = max(1, min(10, len(tr["losses"]) // 3))
    rec.update(_param_record(model, method, names))
    rec.update(ranks_start=ranks_start, n_train=len(data["splits"]["train"]), loss_first=sum(tr["losses"][:k]) / k,
               loss_last=sum(tr["losses"][-k:]) / k, losses_every10=tr["losses"][::10],
               cost={"data_s": t1 - t0, "setup_s": setup_s, "train_s": tr["train_s"], "alloc_s": tr["alloc_s"],
                     "step_s_median": tr["step_s_median"], "eval_s": time.perf_counter() - te + tr["eval_during_s"],
                     "rss_base_mib": rss_base, "peak_rss_mib": peak_rss_mib()})
    return rec
