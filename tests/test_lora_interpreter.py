"""The Triton LoRA kernels under the Triton interpreter (``TRITON_INTERPRET=1``), on the CPU, tiny shapes.

How this runs: Triton decides at ``@triton.jit`` time (when :mod:`gelora.kernels.lora` is imported)
whether kernels are compiled or interpreted, and the rest of the test-suite imports that module in
the pytest process already. So the checks run in a child process started with ``TRITON_INTERPRET=1``
in its environment: ``python tests/test_lora_interpreter.py --worker`` prints one JSON record per
comparison, and the tests below assert on those records (one child for the whole file, started by a
module-scoped fixture; about 15-25 s, mostly imports). No conftest hook and no global state.

Under the interpreter the kernels use a single 16x16x16 tile configuration (autotuning needs a GPU)
and a 16-wide rank block, so ranks 17 and 40 already take several rank blocks and K=40 takes the
masked K tail. Everything is float32: the interpreter's ``tl.dot`` on bfloat16 is not faithful.

Tolerances: as in ``test_lora.py``, a kernel result may be at most twice as far from the float64
reference as the same formula in float32 torch (PyTorch's own result) is, plus the length-k rounding
floor ``sqrt(k) eps max|ref|``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.interpreter


# ---------------------------------------------------------------------------------------------------
# child process
# ---------------------------------------------------------------------------------------------------
def _worker() -> None:  # pragma: no cover - runs in the child
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    import copy

    import torch

    sys.path.insert(0, str(HERE))
    import test_lora as T  # the shared comparison helpers

    from gelora import lora as L
    from gelora.kernels import lora as K

    assert K.INTERPRET, "the kernels module was imported without the interpreter"
    torch.manual_seed(0)
    records = []

    def record(section):
        def check(got, peft_val, ref64, what, k=1):
            e_got, e_peft, e_pair, floor = T.error_terms(got, peft_val, ref64, k)
            records.append(dict(section=section, what=what, e_got=e_got, e_peft=e_peft, e_pair=e_pair,
                                floor=floor))
        return check

    def three(fn_kernel, fn_torch, args, what, section, k):
        """kernel(args) vs the same formula in fp32 torch vs float64."""
        got = fn_kernel(*args)
        e = fn_torch(*args)
        r = fn_torch(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
        record(section)(got, e, r, what, k)

    g = torch.Generator().manual_seed(1)
    rnd = lambda *s, sc=1.0: torch.randn(*s, generator=g) * sc  # noqa: E731

    # shrink: S = scale * x A^T, and the transposed form T = s dY B written into a column slice
    for m, k, r in ((37, 40, 1), (37, 48, 3), (5, 40, 17), (33, 16, 40)):
        x, a = rnd(m, k), rnd(r, k, sc=k ** -0.5)
        s = 0.75
        three(lambda x, a: K.lora_shrink(x, a, torch.full((r,), s)), lambda x, a: s * (x @ a.t()),
              (x, a), f"shrink m={m} k={k} r={r}", "shrink", k)
        b = rnd(k, r)
        out = torch.full((m, r + 5), float("nan"))
        three(lambda x, b: K.lora_shrink(x, b, torch.full((r,), s), out=out[:, 2:2 + r], a_transposed=True).clone(),
              lambda x, b: s * (x @ b), (x, b), f"shrink^T m={m} k={k} r={r}", "shrink", k)
        assert torch.isnan(out[:, :2]).all() and torch.isnan(out[:, 2 + r:]).all(), "wrote outside its slice"

    # fused forward and dX, one projection
    for m, k, n, r, bias in ((37, 40, 33, 1, True), (16, 48, 16, 3, False), (37, 40, 20, 8, True),
                             (3, 40, 48, 17, True), (21, 32, 9, 40, False)):
        x, w, a, b = rnd(m, k), rnd(n, k, sc=k ** -0.5), rnd(r, k, sc=k ** -0.5), rnd(n, r)
        bias_t = rnd(n) if bias else None
        s = 2.0 / r
        fwd_k = lambda x, w, a, b: K.lora_fused_forward(  # noqa: E731
            x, K.lora_shrink(x, a, torch.full((r,), s)), [w], [bias_t], [b], [r], [0])[0]
        fwd_t = lambda x, w, a, b: K.lora_linear_reference(  # noqa: E731
            x, w, None if bias_t is None else bias_t.to(x.dtype), a, b, s)
        three(fwd_k, fwd_t, (x, w, a, b), f"forward m={m} k={k} n={n} r={r} bias={bias}", "forward", max(k, r))
        dy, t = rnd(m, n), rnd(m, r)
        three(lambda dy, w, t, a: K.lora_fused_dx([dy], [w], t, a), lambda dy, w, t, a: dy @ w + t @ a,
              (dy, w, t, a), f"dx m={m} k={k} n={n} r={r}", "dx", max(n, r))

    # grouped: three projections, different widths and ranks, one without bias
    m, k = 37, 40
    ranks, widths, offs = (3, 17, 8), (48, 16, 24), (0, 3, 20)
    x = rnd(m, k)
    ws = [rnd(n, k, sc=k ** -0.5) for n in widths]
    bs = [rnd(widths[0]), None, rnd(widths[2])]
    a_s = [rnd(r, k, sc=k ** -0.5) for r in ranks]
    b_s = [rnd(n, r) for n, r in zip(widths, ranks)]
    ss = (0.5, 2.0, 1.0)
    scale = torch.cat([torch.full((r,), s) for r, s in zip(ranks, ss)])
    ys = K.lora_fused_forward(x, K.lora_shrink(x, torch.cat(a_s), scale), ws, bs, b_s, ranks, offs)
    ye = K.lora_grouped_reference(x, ws, bs, a_s, b_s, ss)
    yr = K.lora_grouped_reference(x, ws, bs, a_s, b_s, ss, dtype=torch.float64)
    for i in range(3):
        record("grouped")(ys[i], ye[i], yr[i], f"grouped forward y{i}", k)
    dys = [rnd(m, n) for n in widths]
    t_cat = rnd(m, sum(ranks))
    a_cat = torch.cat(a_s)
    dx = K.lora_fused_dx(dys, ws, t_cat, a_cat)
    dx_e = sum(dy @ w for dy, w in zip(dys, ws)) + t_cat @ a_cat
    dx_r = sum(dy.double() @ w.double() for dy, w in zip(dys, ws)) + t_cat.double() @ a_cat.double()
    record("grouped")(dx, dx_e, dx_r, "grouped dx", sum(widths))

    # the autograd function on the Triton backend: output and every gradient, 3-D input
    for r in (1, 17):
        x, w, bias_t, a, b = rnd(2, 9, 40), rnd(24, 40, sc=0.2), rnd(24), rnd(r, 40, sc=0.2), rnd(24, r)
        outs = {}
        for name in ("triton", "eager", "ref"):
            dt = torch.float64 if name == "ref" else torch.float32
            leaves = [t.detach().to(dt).clone().requires_grad_() for t in (x, a, b)]
            if name == "triton":
                y = L.lora_linear(leaves[0], w, bias_t, leaves[1], leaves[2], 0.5, backend="triton")
            else:
                y = K.lora_linear_reference(leaves[0], w.to(dt), bias_t.to(dt), leaves[1], leaves[2], 0.5)
            y.backward(torch.ones_like(y).mul_(torch.linspace(-1, 1, y.shape[-1], dtype=dt)))
            outs[name] = [y] + [t.grad for t in leaves]
        for i, nm in enumerate(("y", "dX", "dA", "dB")):
            record("autograd")(outs["triton"][i], outs["eager"][i], outs["ref"][i], f"autograd r={r} {nm}", 40)

    # a PEFT model fused on the Triton backend, q/k/v and gate/up grouped: outputs, gradients, steps
    eager = T.peft_block(r=4, rank_pattern={"q_proj": 3, "k_proj": 17, "v_proj": 1, "up_proj": 9})
    fused = copy.deepcopy(eager)
    rep = L.fuse_lora(fused, backend="triton", group_siblings=True)
    assert len(rep.fused) == 7 and len(rep.groups) == 2, rep
    T.compare_models(fused, eager, torch.randn(2, 5, 40, generator=g), "peft", check=record("peft"))

    def curve(model, dtype):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02)
        gg = torch.Generator().manual_seed(3)
        out = []
        for _ in range(3):
            xb = torch.randn(3, 7, 40, generator=gg).to(dtype)
            tb = torch.randn(3, 7, 40, generator=gg).to(dtype)
            loss = torch.nn.functional.mse_loss(model(xb), tb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.detach())
        return torch.stack(out)

    c_ref = curve(copy.deepcopy(eager).double(), torch.float64)
    assert torch.isfinite(c_ref).all() and c_ref[-1] < c_ref[0], f"reference did not train: {c_ref}"
    record("training")(curve(fused, torch.float32), curve(eager, torch.float32), c_ref, "loss curve", 3 * 7 * 40)
    print("RECORDS " + json.dumps(records))


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def records():
    pytest.importorskip("triton")
    pytest.importorskip("peft")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("GELORA_LORA_BACKEND", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORDS ")]
    assert proc.returncode == 0 and lines, (f"interpreter worker failed (rc={proc.returncode}):\n"
                                            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RECORDS "):])


def _check(records, section, expected_min):
    rows = [r for r in records if r["section"] == section]
    assert len(rows) >= expected_min, f"{section}: only {len(rows)} comparisons ran"
    bad = [r for r in rows if not (r["e_got"] <= 2 * r["e_peft"] + r["floor"]
                                   and r["e_pair"] <= 3 * r["e_peft"] + 2 * r["floor"])]
    assert not bad, "\n".join(f"{r['what']}: |kernel-ref64|={r['e_got']:.3g} |torch32-ref64|={r['e_peft']:.3g} "
                              f"|kernel-torch32|={r['e_pair']:.3g} floor={r['floor']:.3g}" for r in bad)


def test_shrink_kernel(records):
    _check(records, "shrink", 8)


def test_fused_forward_kernel(records):
    _check(records, "forward", 5)


def test_dx_kernel(records):
    _check(records, "dx", 5)


def test_grouped_kernels(records):
    _check(records, "grouped", 4)


def test_autograd_function_on_triton_backend(records):
    _check(records, "autograd", 8)


def test_fused_peft_model_on_triton_backend(records):
    _check(records, "peft", 2 + 14)  # output, dX and the 14 LoRA weights of the 7 projections


def test_training_steps_on_triton_backend(records):
    _check(records, "training", 1)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
