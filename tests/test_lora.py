"""Fused LoRA layers against PEFT's eager layer and a float64 reference (torch path on the CPU; the
Triton path on CUDA under the ``gpu`` marker; the Triton kernels under the interpreter live in
``test_lora_interpreter.py``).

Tolerances are derived, not picked: for every output and gradient the fused result may be at most
twice as far from the float64 result as PEFT's own result in the same dtype is (max norm), plus the
typical rounding error of a length-k dot product, ``sqrt(k) * eps * max|ref|`` (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., section 3.1: random-sign rounding errors grow like
``sqrt(k) u``), with k the longest reduction in the computation. Below that floor two equally valid
summation orders (MKL picks different kernels for ``x @ A.t()`` and ``F.linear``) disagree by chance;
see :func:`assert_as_good`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gelora.lora as L
import gelora.lora.backends  # noqa: F401  (patched below)
import gelora.lora.inject  # noqa: F401
from gelora.neighbours.engines import BackendUnavailable
from gelora.kernels import lora as K

try:
    from peft import LoraConfig, PeftModel, get_peft_model
except ImportError:  # the kernel-level tests below still run; the PEFT comparisons are skipped
    LoraConfig = PeftModel = get_peft_model = None
needs_peft = pytest.mark.skipif(get_peft_model is None, reason="needs peft")

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def error_terms(got: torch.Tensor, peft_val: torch.Tensor, ref64: torch.Tensor, k: int = 1):
    """``(|got - ref64|, |peft - ref64|, |got - peft|, floor)`` in max norm, with the rounding floor
    ``sqrt(k) eps max|ref64|`` (eps of PEFT's dtype, k the longest reduction behind the values)."""
    eps = torch.finfo(peft_val.dtype).eps
    got, peft_val, ref64 = (t.detach().double().cpu() for t in (got, peft_val, ref64))
    assert got.shape == ref64.shape == peft_val.shape, f"shapes {got.shape}, {peft_val.shape}, {ref64.shape}"
    floor = max(1, k) ** 0.5 * eps * float(ref64.abs().max()) + 1e-300
    return (float((got - ref64).abs().max()), float((peft_val - ref64).abs().max()),
            float((got - peft_val).abs().max()), floor)


def assert_as_good(got: torch.Tensor, peft_val: torch.Tensor, ref64: torch.Tensor, what: str, k: int = 1) -> None:
    """``|got - ref64| <= 2 |peft - ref64| + floor`` and, by the triangle inequality,
    ``|got - peft| <= 3 |peft - ref64| + 2 floor`` (see :func:`error_terms`)."""
    e_got, e_peft, e_pair, floor = error_terms(got, peft_val, ref64, k)
    assert e_got <= 2 * e_peft + floor, (f"{what}: |fused - ref64| = {e_got:.3g} > 2 |peft - ref64| + "
                                         f"sqrt(k) eps max|ref| = {2 * e_peft:.3g} + {floor:.3g}")
    assert e_pair <= 3 * e_peft + 2 * floor, f"{what}: |fused - peft| = {e_pair:.3g} > {3 * e_peft + 2 * floor:.3g}"


def longest_reduction(model: nn.Module, x: torch.Tensor) -> int:
    """Longest dot product in a forward+backward of ``model`` on ``x``: a feature width or the token
    count (weight gradients reduce over tokens)."""
    widths = [max(p.shape) for p in model.parameters()]
    return max([x.numel() // x.shape[-1], *widths])


class Block(nn.Module):
    """Attention-and-MLP-shaped toy: q/k/v read one input with different widths, gate/up another."""

    def __init__(self, d=40, dq=24, dkv=8, dff=56, bias=True):
        super().__init__()
        self.q_proj = nn.Linear(d, dq, bias=bias)
        self.k_proj = nn.Linear(d, dkv, bias=False)
        self.v_proj = nn.Linear(d, dkv, bias=bias)
        self.o_proj = nn.Linear(dq + 2 * dkv, d, bias=bias)
        self.gate_proj = nn.Linear(d, dff, bias=False)
        self.up_proj = nn.Linear(d, dff, bias=False)
        self.down_proj = nn.Linear(dff, d, bias=True)

    def forward(self, x):
        h = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        h = x + self.o_proj(torch.tanh(h))
        return h + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_block(seed=0, **cfg):
    torch.manual_seed(seed)
    cfg.setdefault("r", 8)
    cfg.setdefault("lora_alpha", 16)
    cfg.setdefault("target_modules", ALL)
    cfg.setdefault("init_lora_weights", False)  # random B too, so the LoRA term is not zero
    return get_peft_model(Block(), LoraConfig(**cfg))


def run_fwd_bwd(model, x, g):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(g.to(y.dtype))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.detach(), grads


def compare_models(fused, eager, x, what="", check=None):
    """Fused vs eager (same dtype) vs a float64 copy of the eager model: output and every gradient,
    each through ``check(got, peft, ref64, what, k)`` (default :func:`assert_as_good`)."""
    check = check or assert_as_good
    ref = copy.deepcopy(eager).double()
    k = longest_reduction(eager, x)
    g = torch.randn(eager(x).shape, generator=torch.Generator().manual_seed(1))
    y_e, dx_e, gr_e = run_fwd_bwd(eager, x, g)
    y_f, dx_f, gr_f = run_fwd_bwd(fused, x, g)
    y_r, dx_r, gr_r = run_fwd_bwd(ref, x.double(), g.double())
    check(y_f, y_e, y_r, f"{what} output", k)
    check(dx_f, dx_e, dx_r, f"{what} dX", k)
    assert set(gr_f) == set(gr_e) == set(gr_r), "different parameters received gradients"
    assert gr_e, "no parameter got a gradient"
    for n in gr_e:
        check(gr_f[n], gr_e[n], gr_r[n], f"{what} d{n}", k)


# ---------------------------------------------------------------------------------------------------
# the fused layer against PEFT's eager layer
# ---------------------------------------------------------------------------------------------------
class One(nn.Module):
    def __init__(self, k, n, bias):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("r", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("shape,k,n,bias", [((97,), 59, 33, True), ((2, 5), 64, 97, False), ((1,), 16, 1, True)])
@needs_peft
def test_single_layer_matches_peft(r, shape, k, n, bias):
    torch.manual_seed(r)
    eager = get_peft_model(One(k, n, bias), LoraConfig(r=r, lora_alpha=3 * r, target_modules=["proj"],
                                                        init_lora_weights=False))
    fused = copy.deepcopy(eager)
    rep = L.fuse_lora(fused)
    assert rep.fused == ["base_model.model.proj"], rep
    assert type(fused.base_model.model.proj).__name__ == "FusedLoraLinear"
    x = torch.randn(*shape, k)
    compare_models(fused, eager, x, f"r={r} x{tuple(x.shape)}")


@pytest.mark.parametrize("recompute", [False, True])
def test_lora_linear_against_reference(recompute):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 59, generator=g).transpose(0, 1)  # non-contiguous 3-D input
    w, b = torch.randn(97, 59, generator=g) / 8, torch.randn(97, generator=g)
    a, bb = torch.randn(17, 59, generator=g) / 8, torch.randn(97, 17, generator=g)
    ins = [t.clone().requires_grad_() for t in (x, w, b, a, bb)]
    ins_e = [t.clone().requires_grad_() for t in (x, w, b, a, bb)]
    ins_r = [t.double().requires_grad_() for t in (x, w, b, a, bb)]
    y = L.lora_linear(*ins, 0.375, backend="torch", recompute_shrink=recompute)
    y_e = L.lora_linear_reference(*ins_e, 0.375)
    y_r = L.lora_linear_reference(*ins_r, 0.375)
    gy = torch.randn(y.shape, generator=g)
    for t, z in ((y, ins), (y_e, ins_e), (y_r, ins_r)):
        t.backward(gy.to(t.dtype))
    assert_as_good(y, y_e, y_r, "y", 97)
    for name, p, pe, pr in zip(["x", "W", "b", "A", "B"], ins, ins_e, ins_r):
        assert_as_good(p.grad, pe.grad, pr.grad, f"d{name}", 97)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_torch_path(dtype):
    """bf16/fp16 on the torch path with the LoRA term dominant and a scale halfway between two bf16
    numbers (s = 1.75 + 2^-8; bf16 would round it to 1.75).

    Besides the max-norm bound, the output's least-squares gain against float64,
    ``<y, ref> / <ref, ref>``, must be 1 to within twice PEFT's deviation plus ``4 eps / sqrt(n)``
    (unbiased rounding errors average out over n outputs). A scale rounded to bf16 would bias every
    output by 0.22 %: under one ulp, invisible in the max norm, several times that gain bound.
    (A scale just above 1 would not do: PEFT's own ``y * s`` in bf16 then rounds back to ``y``.)"""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 33, 64, generator=g)
    w = torch.randn(48, 64, generator=g) / 64  # base term small: the LoRA term dominates y
    a, bb = torch.randn(17, 64, generator=g) / 8, torch.randn(48, 17, generator=g) / 4
    s = 1.75 + 2 ** -8
    outs = {}
    for name, dt in (("fused", dtype), ("eager", dtype), ("ref", torch.float64)):
        leaves = [t.to(dt).requires_grad_() for t in (x, a, bb)]
        if name == "fused":
            y = L.lora_linear(leaves[0], w.to(dt), None, leaves[1], leaves[2], s, backend="torch")
        else:
            y = L.lora_linear_reference(leaves[0], w.to(dt), None, leaves[1], leaves[2], s)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(dt))
        outs[name] = [y, *(t.grad for t in leaves)]
    for i, what in enumerate(["y", "dX", "dA", "dB"]):
        assert_as_good(outs["fused"][i], outs["eager"][i], outs["ref"][i], f"{dtype} {what}", 66)
    ref = outs["ref"][0].detach().double()
    gain = lambda y: float((y.detach().double() * ref).sum() / ref.pow(2).sum())  # noqa: E731
    bound = 2 * abs(gain(outs["eager"][0]) - 1) + 4 * torch.finfo(dtype).eps / ref.numel() ** 0.5
    assert abs(gain(outs["fused"][0]) - 1) <= bound, f"{dtype}: output gain {gain(outs['fused'][0])} biased"


def test_grouped_bf16_scale_is_not_rounded():
    """The grouped shrink scales each rank block by its own s_g (in fp32): the outputs' gains against
    float64 stay within the bound of :func:`test_half_precision_torch_path`."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(66, 64, generator=g)
    ranks, ss = (17, 5), (1.75 + 2 ** -8, 0.875 + 2 ** -9)  # halfway between bf16 neighbours
    a_s = [torch.randn(r, 64, generator=g) / 8 for r in ranks]
    b_s = [torch.randn(48, r, generator=g) / 4 for r in ranks]
    w = torch.zeros(48, 64)
    bf = lambda ts: [t.to(torch.bfloat16) for t in ts]  # noqa: E731
    ys = L.lora_grouped_linear(x.bfloat16(), bf([w, w]), [None, None], bf(a_s), bf(b_s), ss, backend="torch")
    for i in range(2):
        ref = L.lora_linear_reference(x.double(), w.double(), None, a_s[i].double(), b_s[i].double(), ss[i])
        eager = L.lora_linear_reference(x.bfloat16(), w.bfloat16(), None, *bf([a_s[i], b_s[i]]), ss[i])
        gain = lambda y: float((y.double() * ref).sum() / ref.pow(2).sum())  # noqa: E731
        bound = 2 * abs(gain(eager) - 1) + 4 * torch.finfo(torch.bfloat16).eps / ref.numel() ** 0.5
        assert abs(gain(ys[i]) - 1) <= bound, f"projection {i}: gain {gain(ys[i])} biased (bound {bound:.3g})"


def test_frozen_weight_gets_no_gradient():
    w = torch.randn(6, 5)
    a = torch.randn(2, 5, requires_grad=True)
    bb = torch.randn(6, 2, requires_grad=True)
    x = torch.randn(4, 5)  # no grad: dX is not computed either
    L.lora_linear(x, w, None, a, bb, 2.0, backend="torch").sum().backward()
    assert w.grad is None and x.grad is None
    assert a.grad is not None and bb.grad is not None


@pytest.mark.parametrize("recompute", [False, True])
def test_gradcheck_float64(recompute):
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, w, b, a, bb = mk(2, 3, 7), mk(5, 7), mk(5), mk(3, 7), mk(5, 3)
    fn = lambda x, w, b, a, bb: L.lora_linear(x, w, b, a, bb, 0.7, backend="torch",  # noqa: E731
                                              recompute_shrink=recompute)
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


def test_gradcheck_grouped_float64():
    g = torch.Generator().manual_seed(4)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    ranks, widths = (3, 1, 5), (6, 2, 4)
    x = mk(4, 7)
    ws = [mk(n, 7) for n in widths]
    bs = [mk(widths[0]), None, mk(widths[2])]
    a_s = [mk(r, 7) for r in ranks]
    b_s = [mk(n, r) for n, r in zip(widths, ranks)]

    def fn(x, *p):
        return tuple(L.lora_grouped_linear(x, p[0:3], [p[3], None, p[4]], p[5:8], p[8:11], (0.5, 2.0, 1.25),
                                           backend="torch"))

    assert torch.autograd.gradcheck(fn, (x, *ws, bs[0], bs[2], *a_s, *b_s))


# ---------------------------------------------------------------------------------------------------
# CPU paths of the torch backend: merged weights (auto/never/always) x one-pass C++ weight gradients
# ---------------------------------------------------------------------------------------------------
def _count_paths(monkeypatch):
    """Counts merges and calls of the C++ weight-gradient kernel."""
    calls = {"merge": 0, "kernel": 0}
    orig_merge, orig_kernel = L.TorchLoraBackend.merged_weights, gelora.lora.backends._cpu_lora_grad

    def merge(*a):
        calls["merge"] += 1
        return orig_merge(*a)

    def kernel(x):
        k = orig_kernel(x)
        if k is None:
            return None

        def counted(*a, **kw):
            calls["kernel"] += 1
            return k(*a, **kw)
        return counted

    monkeypatch.setattr(L.TorchLoraBackend, "merged_weights", staticmethod(merge))
    monkeypatch.setattr(gelora.lora.backends, "_cpu_lora_grad", kernel)
    return calls


def _has_kernel() -> bool:
    try:
        from gelora import _C
    except ImportError:
        return False
    return hasattr(_C, "lora_grad")


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("kernel", ["0", "1"])
@pytest.mark.parametrize("merge", ["never", "always"])
def test_cpu_paths_against_reference(merge, kernel, recompute, monkeypatch):
    monkeypatch.setenv("GELORA_LORA_MERGE", merge)
    monkeypatch.setenv("GELORA_LORA_CPU_KERNEL", kernel)
    calls = _count_paths(monkeypatch)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 70, 59, generator=g).transpose(0, 1)  # 210 tokens, non-contiguous
    w, b = torch.randn(97, 59, generator=g) / 8, torch.randn(97, generator=g)
    a, bb = torch.randn(17, 59, generator=g) / 8, torch.randn(97, 17, generator=g)
    ins = [t.clone().requires_grad_() for t in (x, w, b, a, bb)]
    ins_e = [t.clone().requires_grad_() for t in (x, w, b, a, bb)]
    ins_r = [t.double().requires_grad_() for t in (x, w, b, a, bb)]
    y = L.lora_linear(*ins, 0.375, backend="torch", recompute_shrink=recompute)
    y_e = L.lora_linear_reference(*ins_e, 0.375)
    y_r = L.lora_linear_reference(*ins_r, 0.375)
    gy = torch.randn(y.shape, generator=g)
    for t in (y, y_e, y_r):
        t.backward(gy.to(t.dtype))
    k = 210
    assert_as_good(y, y_e, y_r, "y", k)
    for name, p, pe, pr in zip(["x", "W", "b", "A", "B"], ins, ins_e, ins_r):
        assert_as_good(p.grad, pe.grad, pr.grad, f"d{name}", k)
    merged = merge == "always"
    # merged in forward; merged again in backward unless kept (N=97 <= M=210 and not recompute)
    assert calls["merge"] == (0 if not merged else (2 if recompute else 1)), calls
    assert calls["kernel"] == (1 if kernel == "1" and _has_kernel() else 0), calls


def test_row_strided_input_takes_blas(monkeypatch):
    """x with a row stride above K (a column slice of a wider tensor) cannot go to the C++ kernels,
    which need C-contiguous rows: the layer still runs, on BLAS, with the same result."""
    monkeypatch.setenv("GELORA_LORA_MERGE", "never")
    g = torch.Generator().manual_seed(13)
    wide = torch.randn(40, 90, generator=g)
    x = wide[:, :59]
    assert not x.is_contiguous() and x.stride(-1) == 1
    w, a, bb = torch.randn(33, 59, generator=g), torch.randn(5, 59, generator=g), torch.randn(33, 5, generator=g)
    y = L.lora_linear(x, w, None, a, bb, 0.5, backend="torch")
    y_c = L.lora_linear(x.contiguous(), w, None, a, bb, 0.5, backend="torch")
    ref = L.lora_linear_reference(x.double(), w.double(), None, a.double(), bb.double(), 0.5)
    assert_as_good(y, y_c, ref, "row-strided y", 59)


@pytest.mark.parametrize("kernel", ["0", "1"])
@pytest.mark.parametrize("merge", ["never", "always"])
def test_cpu_paths_grouped(merge, kernel, monkeypatch):
    monkeypatch.setenv("GELORA_LORA_MERGE", merge)
    monkeypatch.setenv("GELORA_LORA_CPU_KERNEL", kernel)
    g = torch.Generator().manual_seed(11)
    ranks, widths, ss = (3, 17, 8), (48, 16, 24), (0.5, 2.0, 1.25)
    x = torch.randn(150, 40, generator=g)
    ws = [torch.randn(n, 40, generator=g) / 6 for n in widths]
    bs = [torch.randn(widths[0], generator=g), None, torch.randn(widths[2], generator=g)]
    a_s = [torch.randn(r, 40, generator=g) / 6 for r in ranks]
    b_s = [torch.randn(n, r, generator=g) for n, r in zip(widths, ranks)]
    leaves = lambda dt: [t.to(dt).clone().requires_grad_() for t in (x, *a_s, *b_s)]  # noqa: E731
    outs = {}
    for name, dt in (("fused", torch.float32), ("eager", torch.float32), ("ref", torch.float64)):
        lv = leaves(dt)
        xx, aa, bb_ = lv[0], lv[1:4], lv[4:7]
        wd = [w.to(dt) for w in ws]
        bd = [None if v is None else v.to(dt) for v in bs]
        if name == "fused":
            ys = L.lora_grouped_linear(xx, wd, bd, aa, bb_, ss, backend="torch")
        else:
            ys = [L.lora_linear_reference(xx, wd[i], bd[i], aa[i], bb_[i], ss[i]) for i in range(3)]
        sum((y * torch.linspace(-1, 1, y.numel(), dtype=dt).reshape(y.shape)).sum() for y in ys).backward()
        outs[name] = [*ys, *(t.grad for t in lv)]
    for i in range(len(outs["ref"])):
        assert_as_good(outs["fused"][i], outs["eager"][i], outs["ref"][i], f"{merge}/{kernel} item {i}", 150)


@pytest.mark.parametrize("recompute", [False, True])
def test_gradcheck_float64_merged(recompute, monkeypatch):
    monkeypatch.setenv("GELORA_LORA_MERGE", "always")
    calls = _count_paths(monkeypatch)
    g = torch.Generator().manual_seed(12)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, w, b, a, bb = mk(3, 4, 7), mk(5, 7), mk(5), mk(3, 7), mk(5, 3)
    fn = lambda x, w, b, a, bb: L.lora_linear(x, w, b, a, bb, 0.7, backend="torch",  # noqa: E731
                                              recompute_shrink=recompute)
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))
    assert calls["merge"] > 0


def test_merge_rule_picks_by_cost(monkeypatch):
    """auto: merge when 2 N K r per merge is below the separate term's 2 M r (N + K); keep the merged
    weight when it is no larger than the input (N <= M)."""
    monkeypatch.delenv("GELORA_LORA_MERGE", raising=False)
    ops = L.TorchLoraBackend()
    w = torch.zeros(64, 64)
    assert ops.merge_plan(torch.zeros(512, 64), [w], [8], False) is True
    assert ops.merge_plan(torch.zeros(512, 64), [w], [8], True) is False
    assert ops.merge_plan(torch.zeros(16, 64), [w], [8], False) is None
    assert ops.merge_plan(torch.zeros(512, 64, dtype=torch.bfloat16), [w.bfloat16()], [8], False) is None
    monkeypatch.setenv("GELORA_LORA_MERGE", "sometimes")
    with pytest.raises(ValueError, match="GELORA_LORA_MERGE"):
        ops.merge_plan(torch.zeros(512, 64), [w], [8], False)


def test_grouped_matches_reference_and_unused_output():
    g = torch.Generator().manual_seed(5)
    ranks, widths = (3, 17, 8), (48, 16, 24)
    x = torch.randn(2, 9, 40, generator=g)
    ws = [torch.randn(n, 40, generator=g) / 6 for n in widths]
    bs = [torch.randn(widths[0], generator=g), None, torch.randn(widths[2], generator=g)]
    a0 = [torch.randn(r, 40, generator=g) / 6 for r in ranks]
    b0 = [torch.randn(n, r, generator=g) for n, r in zip(widths, ranks)]
    ss = (0.5, 2.0, 1.0)
    results = {}
    for name, dt in (("fused", None), ("eager", None), ("ref", torch.float64)):
        cast = (lambda t: t) if dt is None else (lambda t: None if t is None else t.to(dt))  # noqa: E731
        leaves = [cast(t).clone().requires_grad_() for t in [x] + a0 + b0]
        args = (leaves[0], [cast(w) for w in ws], [cast(b) for b in bs], leaves[1:4], leaves[4:7], ss)
        ys = (L.lora_grouped_linear(*args, backend="torch") if name == "fused"
              else L.lora_grouped_reference(*args))
        # only two of the three outputs feed the loss: the second projection gets zero gradients
        (ys[0].sum() + ys[2].pow(2).sum()).backward()
        results[name] = (ys, [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves])
    (yf, gf), (ye, ge), (yr, gr) = results["fused"], results["eager"], results["ref"]
    for i in range(3):
        assert_as_good(yf[i], ye[i], yr[i], f"y{i}", 48)
    for i, (a_, b_, c_) in enumerate(zip(gf, ge, gr)):
        assert_as_good(a_, b_, c_, f"grad of leaf {i}", 48)
    assert float(gf[2].abs().max()) == 0.0 and float(gf[5].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------
# PEFT integration
# ---------------------------------------------------------------------------------------------------
@needs_peft
def test_rank_and_alpha_patterns_and_rslora():
    eager = peft_block(r=4, lora_alpha=8, use_rslora=True,
                       rank_pattern={"q_proj": 3, "k_proj": 17, "v_proj": 1, "up_proj": 64},
                       alpha_pattern={"q_proj": 5, "up_proj": 2})
    fused = copy.deepcopy(eager)
    rep = L.fuse_lora(fused)
    assert len(rep.fused) == 7 and not rep.skipped
    mods = dict(fused.named_modules())
    q = mods["base_model.model.q_proj"]
    assert q.r["default"] == 3 and q.scaling["default"] == pytest.approx(5 / 3 ** 0.5)
    assert mods["base_model.model.up_proj"].scaling["default"] == pytest.approx(2 / 8)
    compare_models(fused, eager, torch.randn(3, 5, 40), "patterns")


@needs_peft
def test_parameters_are_shared_and_unfuse_restores():
    model = peft_block()
    before = {n: p for n, p in model.named_parameters()}
    x = torch.randn(4, 40)
    y0 = model(x)
    L.fuse_lora(model)
    after = {n: p for n, p in model.named_parameters()}
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    rep2 = L.fuse_lora(model)
    assert not rep2.fused and all("already fused" in v for v in rep2.skipped.values())
    torch.testing.assert_close(model(x), y0, rtol=1e-5, atol=1e-5)
    names = L.unfuse_lora(model)
    assert len(names) == 7
    from peft.tuners.lora.layer import Linear as PeftLinear

    assert all(type(m) is PeftLinear for n, m in model.named_modules() if n.endswith("_proj"))
    assert not any(hasattr(m, "_gelora_state") for m in model.modules())
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


@needs_peft
def test_optimizer_steps_same_loss_curve():
    """A few AdamW steps: fused and eager follow the float64 loss curve equally well."""

    def curve(model, dtype):
        model = model.to(dtype)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(7)
        losses = []
        for _ in range(6):
            x = torch.randn(8, 5, 40, generator=g).to(dtype)
            t = torch.randn(8, 5, 40, generator=g).to(dtype)
            loss = nn.functional.mse_loss(model(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    base = peft_block(seed=2, r=4, rank_pattern={"k_proj": 1, "up_proj": 9})
    eager = curve(copy.deepcopy(base), torch.float32)
    fused_model = copy.deepcopy(base)
    L.fuse_lora(fused_model)
    fused = curve(fused_model, torch.float32)
    ref = curve(copy.deepcopy(base), torch.float64)
    assert_as_good(fused, eager, ref, "loss curve", 8 * 5 * 40)  # the loss is a mean over 8*5*40 values
    assert float(fused[-1]) < float(fused[0])  # it trained


@needs_peft
def test_multiple_adapters_fuse_active_fallback_others():
    model = peft_block(r=4)
    model.add_adapter("other", LoraConfig(r=6, lora_alpha=3, target_modules=ALL, init_lora_weights=False))
    eager = copy.deepcopy(model)
    rep = L.fuse_lora(model)  # the active adapter: "default"
    assert len(rep.fused) == 7
    assert all(m._gelora_state.adapter == "default" for m in model.modules() if hasattr(m, "_gelora_state"))
    x = torch.randn(3, 40)
    compare_models(model, eager, x, "default adapter")
    for m in (model, eager):
        m.set_adapter("other")
    calls = []
    orig = L.lora_linear
    try:
        L.lora_linear = lambda *a, **k: calls.append(1) or orig(*a, **k)
        compare_models(model, eager, x, "other adapter (eager fallback)")
    finally:
        L.lora_linear = orig
    assert not calls, "a non-fused adapter must run PEFT's own forward"
    for m in (model, eager):  # both adapters active: fused default + eager other
        m.base_model.set_adapter(["default", "other"])
    compare_models(model, eager, x, "two active adapters")
    for m in (model, eager):
        m.base_model.set_adapter("default")
    with model.disable_adapter(), eager.disable_adapter():
        torch.testing.assert_close(model(x), eager(x), rtol=0, atol=0)


@needs_peft
def test_save_pretrained_and_merge_and_unload(tmp_path):
    model = peft_block(r=5)
    x = torch.randn(6, 40)
    L.fuse_lora(model)
    y = model(x).detach()
    sd_keys = set(model.state_dict())
    model.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(_seeded_block(0), tmp_path)
    torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)
    L.unfuse_lora(model)
    assert set(model.state_dict()) == sd_keys
    L.fuse_lora(model)
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-5)


def _seeded_block(seed):
    torch.manual_seed(seed)
    return Block()


@needs_peft
def test_dropout_falls_back_in_training_and_fuses_in_eval():
    model = peft_block(r=4, lora_dropout=0.25)
    eager = copy.deepcopy(model)
    rep = L.fuse_lora(model)
    assert len(rep.notes) == 7 and all("dropout" in v for v in rep.notes.values())
    x = torch.randn(5, 40)
    model.train()
    eager.train()
    torch.manual_seed(11)
    y_f = model(x)
    torch.manual_seed(11)
    y_e = eager(x)
    torch.testing.assert_close(y_f, y_e, rtol=0, atol=0)  # the very same eager computation
    model.eval()
    eager.eval()
    compare_models(model, eager, x, "dropout eval")


@needs_peft
def test_sibling_groups_one_launch_and_cross_input_switch_off(monkeypatch):
    eager = peft_block(r=4, rank_pattern={"q_proj": 3, "k_proj": 17, "v_proj": 8, "gate_proj": 5})
    fused = copy.deepcopy(eager)
    rep = L.fuse_lora(fused, group_siblings=True)
    assert sorted(rep.groups) == [("base_model.model.gate_proj", "base_model.model.up_proj"),
                                  ("base_model.model.q_proj", "base_model.model.k_proj",
                                   "base_model.model.v_proj")]
    calls = []
    orig = L.lora_grouped_linear
    monkeypatch.setattr(gelora.lora.inject, "lora_grouped_linear",
                        lambda *a, **k: calls.append(len(a[1])) or orig(*a, **k))
    compare_models(fused, eager, torch.randn(2, 7, 40), "grouped")
    assert sorted(set(calls)) == [2, 3], calls  # q/k/v in one launch, gate/up in one launch
    # a sibling called with another input (cross-attention): grouping switches off, results stay right
    mods = dict(fused.named_modules())
    emods = dict(eager.named_modules())
    q, k = mods["base_model.model.q_proj"], mods["base_model.model.k_proj"]
    x1, x2 = torch.randn(3, 40), torch.randn(3, 40)
    torch.testing.assert_close(q(x1), emods["base_model.model.q_proj"](x1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k(x2), emods["base_model.model.k_proj"](x2), rtol=1e-5, atol=1e-5)
    assert not q._gelora_state.group.enabled


@needs_peft
def test_autocast_bf16_cpu():
    eager = peft_block(r=8)
    fused = copy.deepcopy(eager)
    L.fuse_lora(fused)
    ref = copy.deepcopy(eager).double()
    x = torch.randn(4, 6, 40)
    q_e, q_f = eager.base_model.model.q_proj, fused.base_model.model.q_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_e = eager(x)
        y_f = fused(x)
        assert q_f(x).dtype == q_e(x).dtype == torch.bfloat16
    assert y_f.dtype == y_e.dtype
    assert_as_good(y_f, y_e, ref(x.double()), "autocast output", 56)


@needs_peft
def test_bf16_base_with_fp32_adapter():
    """PEFT keeps adapters in fp32 next to a bf16 base (``autocast_adapter_dtype``); the fused layer
    computes the adapter in bf16. Yardstick: PEFT's layer with the adapter cast to bf16 (PyTorch's own
    bf16 result for the same computation), against float64."""
    torch.manual_seed(0)
    model = get_peft_model(Block().to(torch.bfloat16), LoraConfig(r=8, lora_alpha=16, target_modules=ALL,
                                                                  init_lora_weights=False))
    q = model.base_model.model.q_proj
    assert q.lora_A["default"].weight.dtype == torch.float32 and q.get_base_layer().weight.dtype == torch.bfloat16
    fused = copy.deepcopy(model)
    assert len(L.fuse_lora(fused).fused) == 7
    eager_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.randn(3, 5, 40).to(torch.bfloat16)
    compare_models(fused, eager_bf16, x, "bf16 base + fp32 adapter")
    y = fused(x)
    y.float().sum().backward()
    assert q.lora_A["default"].weight.dtype == torch.float32
    assert fused.base_model.model.q_proj.lora_A["default"].weight.grad.dtype == torch.float32


@needs_peft
def test_tiny_llama_training_matches():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False,
                      rank_pattern={"q_proj": 3, "k_proj": 17, "v_proj": 1, "up_proj": 9})
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))

    def curve(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        out = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.detach())
        return torch.stack(out)

    eager = get_peft_model(copy.deepcopy(base), lcfg)
    fused = copy.deepcopy(eager)
    rep = L.fuse_lora(fused, group_siblings=True)
    assert len(rep.fused) == 14 and len(rep.groups) == 4
    ref = copy.deepcopy(eager).double()
    assert_as_good(curve(fused), curve(eager), curve(ref), "tiny llama loss curve", 2 * 9 * 64)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def _args(k=8, n=6, r=2):
    return [torch.randn(4, k), torch.randn(n, k), torch.randn(n), torch.randn(r, k), torch.randn(n, r)]


def test_bad_input_errors():
    x, w, b, a, bb = _args()
    with pytest.raises(ValueError, match="x has K=7"):
        L.lora_linear(torch.randn(4, 7), w, b, torch.randn(2, 7), bb, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(N, r\)=\(6, 2\)"):
        L.lora_linear(x, w, b, a, torch.randn(6, 3), 1.0)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(r, K\)"):
        L.lora_linear(x, w, b, torch.randn(2, 9), bb, 1.0)
    with pytest.raises(ValueError, match="LoRA rank must be >= 1"):
        L.lora_linear(x, w, b, torch.randn(0, 8), torch.randn(6, 0), 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\)"):
        L.lora_linear(x, w, torch.randn(5), a, bb, 1.0)
    with pytest.raises(TypeError, match="dtype mismatch: x is torch.float32 but lora_A is torch.float16"):
        L.lora_linear(x, w, b, a.half(), bb, 1.0)
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64"):
        L.lora_linear(x.long(), w, b, a, bb, 1.0)
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        L.lora_linear(x, w, b, a, bb, float("nan"))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        L.lora_linear(x, w[None], b, a, bb, 1.0)
    with pytest.raises(ValueError, match="projection 1: lora_B must have shape"):
        L.lora_grouped_linear(x, [w, w], [b, b], [a, a], [bb, torch.randn(6, 5)], [1.0, 1.0])
    with pytest.raises(ValueError, match="one entry per projection"):
        L.lora_grouped_linear(x, [w, w], [b], [a, a], [bb, bb], [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown LoRA backend 'cuda'"):
        L.lora_linear(x, w, b, a, bb, 1.0, backend="cuda")


@pytest.mark.skipif(CUDA or K.INTERPRET, reason="checks the error on a machine without a GPU")
def test_forced_triton_without_gpu_raises_with_reasons():
    with pytest.raises(BackendUnavailable, match="LoRA backend 'triton' cannot run here: .*CUDA"):
        L.lora_linear(*_args(), 1.0, backend="triton")


@pytest.mark.skipif(not K.HAS_TRITON, reason="needs triton")
def test_tuning_keeps_one_or_the_first_configs(monkeypatch):
    import triton

    cfgs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=s)
            for s in (1, 2, 3, 4, 5)]
    x = torch.empty(2, 2, dtype=torch.bfloat16)
    monkeypatch.setattr(K, "TUNE", True)
    monkeypatch.setattr(K, "TUNE_MAX", 0)
    assert K._prune_gemm(cfgs, {"X": x}) == cfgs and K._prune_shrink(cfgs, {}) == cfgs
    monkeypatch.setattr(K, "TUNE_MAX", 3)  # GELORA_LORA_TUNE_MAX=3, as benchmarks/gpu_check.sh sets it
    assert K._prune_gemm(cfgs, {"DY": x}) == cfgs[:3] and K._prune_shrink(cfgs, {}) == cfgs[:3]
    monkeypatch.setattr(K, "TUNE", False)  # GELORA_LORA_TUNE=0 wins
    assert K._prune_gemm(cfgs, {"X": x}) == cfgs[:1] and K._prune_shrink(cfgs, {}) == cfgs[:1]


@needs_peft
def test_fuse_config_validates_and_reports_skips():
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        L.LoraFuseConfig(backend="bogus")
    with pytest.raises(ValueError, match="two or more names"):
        L.LoraFuseConfig(sibling_names=(("q_proj",),))
    model = peft_block(r=4, use_dora=True, target_modules=["q_proj"])
    rep = L.fuse_lora(model)
    assert not rep.fused and "LoRA variant" in rep.skipped["base_model.model.q_proj"]
    model = peft_block(r=4)
    rep = L.fuse_lora(model, adapter_name="missing")
    assert not rep.fused and all("no adapter named 'missing'" in v for v in rep.skipped.values())


def test_backend_table():
    rows = L.describe_lora_backends("cpu")
    assert [r[0] for r in rows] == ["triton", "torch"]
    assert rows[1][1] is True  # torch always runs on the CPU
    assert L.select_lora_backend(torch.zeros(2, 2)).name == ("triton" if K.INTERPRET else "torch")


# ---------------------------------------------------------------------------------------------------
# CUDA kernels, compiled offline (no GPU needed): catches compile errors and lost software pipelining
# ---------------------------------------------------------------------------------------------------
def _offline_compile(kernel, sig, consts, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    full = {n: ("constexpr" if n in consts else sig[n]) for n in fn.arg_names}
    # the JIT marks pointer and integer arguments divisible by 16 (true for these shapes): do the same
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if full[n] != "constexpr"
             and (full[n].startswith("*") or full[n] == "i32")}
    src = ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8, "num_stages": 3})


@pytest.mark.skipif(not K.HAS_TRITON or K.INTERPRET, reason="needs Triton (not in interpreter mode)")
def test_kernels_compile_for_hopper_and_pipeline():
    try:
        from triton.compiler import ASTSource  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:  # pragma: no cover - other Triton layouts
        pytest.skip(f"offline compilation API not available: {exc}")
    P, T = "*bf16", "*i64"
    common = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, INPUT_PRECISION="tf32")
    stage = (128 * 64 + 64 * 128) * 2  # bytes of one A and one B tile in shared memory
    fwd_sig = dict(X=P, W=P, BIAS=P, S=P, B=P, Y=P, W_TAB=T, BIAS_TAB=T, B_TAB=T, Y_TAB=T, N_TAB=T, R_TAB=T,
                   ROFF_TAB=T, M="i32", N="i32", K="i32", R="i32", N_GCD="i32", stride_xm="i32", stride_sm="i32")
    for grouped in (False, True):
        ck = _offline_compile(K._lora_fwd_kernel, fwd_sig, dict(common, HAS_BIAS=True, GROUPED=grouped, BLOCK_R=16,
                                                                 EVEN_K=True, N_ALIGNED=True))
        assert "wgmma" in ck.asm["ptx"], "Hopper tensor-core MMA expected"
        assert ck.metadata.shared >= 2 * stage, f"fwd grouped={grouped}: main loop not software-pipelined"
    dx_sig = dict(DY=P, W=P, T=P, A=P, DX=P, DY_TAB=T, W_TAB=T, N_TAB=T, M="i32", N="i32", K="i32", R="i32",
                  G="i32", N_GCD="i32", stride_dym="i32", stride_tm="i32")
    for grouped in (False, True):
        ck = _offline_compile(K._lora_dx_kernel, dx_sig, dict(common, GROUPED=grouped, BLOCK_R=64, EVEN_N=True,
                                                               N_ALIGNED=True))
        assert ck.metadata.shared >= 2 * stage, f"dx grouped={grouped}: main loop not software-pipelined"
    sh_sig = dict(X=P, A=P, SCALE="*fp32", S=P, M="i32", K="i32", R="i32", stride_xm="i32", stride_ak="i32",
                  stride_ar="i32", stride_sm="i32")
    _offline_compile(K._lora_shrink_kernel, sh_sig, dict(BLOCK_M=16, BLOCK_K=256, BLOCK_R=16, EVEN_K=True,
                                                          INPUT_PRECISION="tf32"))


# ---------------------------------------------------------------------------------------------------
# GPU (Triton path); skipped without CUDA
# ---------------------------------------------------------------------------------------------------
def _rand_layer(m, k, n, r, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, dtype)  # noqa: E731
    return mk(m, k), mk(n, k, sc=k ** -0.5), mk(n), mk(r, k, sc=k ** -0.5), mk(n, r, sc=r ** -0.5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,r,m,k,n", [
    (torch.bfloat16, 1, 1025, 4097, 97), (torch.bfloat16, 17, 1025, 4097, 97), (torch.bfloat16, 64, 2048, 1024, 1024),
    (torch.bfloat16, 256, 3, 59, 4097), (torch.float16, 8, 1025, 4097, 97), (torch.float16, 3, 2048, 1024, 1024),
    (torch.float32, 3, 1025, 4097, 97), (torch.float32, 64, 2048, 1024, 1024),
])
def test_triton_layer_matches_eager_on_gpu(dtype, r, m, k, n):
    x, w, b, a, bb = _rand_layer(m, k, n, r, dtype, "cuda", seed=r)
    s = 2.0 / r
    ins = [t.clone().requires_grad_() for t in (x, a, bb)]
    ins_e = [t.clone().requires_grad_() for t in (x, a, bb)]
    ins_r = [t.double().requires_grad_() for t in (x, a, bb)]
    y = L.lora_linear(ins[0], w, b, ins[1], ins[2], s, backend="triton")
    y_e = L.lora_linear_reference(ins_e[0], w, b, ins_e[1], ins_e[2], s)
    y_r = L.lora_linear_reference(ins_r[0], w.double(), b.double(), ins_r[1], ins_r[2], s)
    gy = torch.randn(y.shape, device="cuda").to(dtype)
    for t in (y, y_e, y_r):
        t.backward(gy.to(t.dtype))
    kk = max(m, k, n)
    assert_as_good(y, y_e, y_r, "y", kk)
    for name, p, pe, pr in zip(["x", "A", "B"], ins, ins_e, ins_r):
        assert_as_good(p.grad, pe.grad, pr.grad, f"d{name}", kk)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_on_gpu(dtype):
    g = torch.Generator().manual_seed(0)
    ranks, widths = (16, 8, 64), (1024, 256, 256)
    x = torch.randn(2, 517, 1024, generator=g).to("cuda", dtype).requires_grad_()
    ws = [(torch.randn(n, 1024, generator=g) / 32).to("cuda", dtype) for n in widths]
    bs = [None, (torch.randn(widths[1], generator=g)).to("cuda", dtype), None]
    a_s = [(torch.randn(r, 1024, generator=g) / 32).to("cuda", dtype).requires_grad_() for r in ranks]
    b_s = [(torch.randn(n, r, generator=g) / 4).to("cuda", dtype).requires_grad_() for n, r in zip(widths, ranks)]
    ss = (2.0, 0.5, 0.25)
    leaves = [x, *a_s, *b_s]

    def grads(ys):
        for t in leaves:
            t.grad = None
        sum((y.double() * (i + 1)).sum() for i, y in enumerate(ys)).backward()
        return [t.grad.clone() for t in leaves]

    ys = L.lora_grouped_linear(x, ws, bs, a_s, b_s, ss, backend="triton")
    gf = grads(ys)
    ye = L.lora_grouped_reference(x, ws, bs, a_s, b_s, ss)
    ge = grads(ye)
    yr = L.lora_grouped_reference(x, ws, bs, a_s, b_s, ss, dtype=torch.float64)
    gr = grads(yr)
    for i in range(3):
        assert_as_good(ys[i], ye[i], yr[i], f"y{i}", 1034)
    for i, (a_, b_, c_) in enumerate(zip(gf, ge, gr)):
        assert_as_good(a_, b_, c_, f"grad {i}", 1034)


@pytest.mark.gpu
@gpu
@needs_peft
def test_fused_peft_training_on_gpu_bf16():
    eager = peft_block(r=8, rank_pattern={"k_proj": 3, "up_proj": 17}).to("cuda", torch.bfloat16)
    fused = copy.deepcopy(eager)
    rep = L.fuse_lora(fused, backend="triton", group_siblings=True)
    assert len(rep.fused) == 7 and len(rep.groups) == 2
    ref = copy.deepcopy(eager).double()

    def curve(model, dtype):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        g = torch.Generator().manual_seed(3)
        out = []
        for _ in range(5):
            x = torch.randn(4, 33, 40, generator=g).to("cuda", dtype)
            loss = model(x).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.detach())
        return torch.stack(out)

    assert_as_good(curve(fused, torch.bfloat16), curve(eager, torch.bfloat16), curve(ref, torch.float64),
                   "bf16 loss curve", 4 * 33 * 40)

