"""Input checking shared by every public entry point.

Everything that reaches a backend went through :func:`as_points`: a 2-D floating tensor (N, D) with
finite values, tokens already selected by the mask. Bad input fails here with a message that names the
problem, never later as a crash or a silent NaN.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from .. import _env

ArrayLike = Union[torch.Tensor, np.ndarray]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

def cpu_core(t: torch.Tensor):
    """The C++ core module when it is built and ``t`` is a float32/float64 CPU tensor, else None.

    Its one-pass helpers (finiteness, row hash, float64 mean, centring, direct distances) replace
    chains of full-size torch temporaries; on a shared machine those chains cost far more than their
    arithmetic (every torch op is an OpenMP region that waits for descheduled threads)."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    return _env.core()


def to_tensor(x: ArrayLike, name: str = "x") -> torch.Tensor:
    """Wrap a numpy array or torch tensor as a tensor without copying where possible."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == np.float16 or x.dtype == np.float32 or x.dtype == np.float64:
            if not x.flags.writeable or any(st < 0 for st in x.strides):
                x = x.copy()
            return torch.from_numpy(x)
        if np.issubdtype(x.dtype, np.complexfloating):
            raise TypeError(f"{name}: complex dtype {x.dtype} is not supported; pass real features")
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            raise TypeError(
                f"{name}: integer/bool dtype {x.dtype} is not supported; cast to float32 first "
                "(integer features make exact distance ties likely, see the duplicates policy)"
            )
        raise TypeError(f"{name}: unsupported numpy dtype {x.dtype}")
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def as_points(
    x: ArrayLike,
    mask: Optional[ArrayLike] = None,
    *,
    name: str = "x",
    check_finite: bool = True,
    min_points: int = 3,
    need: Optional[str] = None,
) -> torch.Tensor:
    """Return the point set of ``x`` as a 2-D floating tensor.

    Args:
        x: (N, D) or (B, T, D) tensor/array of float16, bfloat16, float32 or float64, on any device.
            (B, T, D) hidden states are flattened to (B*T, D) tokens.
        mask: optional boolean (B, T) (or (N,)) tensor/array; True keeps a token (an attention mask of
            0/1 integers is accepted too). Padding tokens are dropped before anything else.
        check_finite: reject NaN/Inf (one reduction over the data).
        min_points: fewest points the caller can work with.
        need: what needs them, for the error message (``"{m}"`` stands for ``min_points``); default:
            TwoNN's two neighbours per point.

    Returns:
        (N', D) tensor with the dtype and device of ``x`` (a view where no mask is given).

    Raises:
        TypeError: complex, integer or bool dtype, or a non-array input.
        ValueError: wrong number of dimensions, empty input, mask of the wrong shape, NaN/Inf, or
            fewer than ``min_points`` points.
    """
    t = to_tensor(x, name)
    if t.is_complex():
        raise TypeError(f"{name}: complex dtype {t.dtype} is not supported; pass real features")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: dtype {t.dtype} is not supported; use float16, bfloat16, float32 or float64 "
            "(cast integer features explicitly)"
        )
    if t.dim() == 3:
        lead = t.shape[:2]
        t = t.reshape(-1, t.shape[-1])
    elif t.dim() == 2:
        lead = t.shape[:1]
    else:
        raise ValueError(
            f"{name}: expected a 2-D (N, D) or 3-D (B, T, D) tensor, got shape {tuple(t.shape)}"
        )
    if t.shape[-1] == 0 or t.shape[0] == 0:
        raise ValueError(f"{name}: empty input of shape {tuple(t.shape)}")
    if mask is not None:
        m = torch.from_numpy(np.asarray(mask)) if isinstance(mask, np.ndarray) else mask
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor or numpy.ndarray, got {type(mask).__name__}")
        if m.is_floating_point() or m.is_complex():
            raise TypeError(f"mask: expected a boolean or 0/1 integer mask, got dtype {m.dtype}")
        if tuple(m.shape) != tuple(lead):
            raise ValueError(
                f"mask: shape {tuple(m.shape)} does not match the leading dimensions {tuple(lead)} of {name}"
            )
        keep = m.reshape(-1).to(device=t.device) != 0
        t = t[keep]
    n = t.shape[0]
    if n < min_points:
        need = need or "TwoNN needs at least {m} (two neighbours per point)"
        raise ValueError(f"{name}: {n} usable point(s); " + need.format(m=min_points))
    if check_finite:
        check_points(t, name)
    return t


def check_k(k, name: str = "k") -> int:
    """``k`` as a Python int after checking it is a number of neighbours: an integer (Python or numpy,
    not a bool) of at least 1. Whether there are more than ``k`` points is checked with the points
    (:func:`k_points_need`).

    Raises:
        TypeError: ``k`` is not an integer. ValueError: ``k < 1``.
    """
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be an integer number of neighbours, got {k!r} ({type(k).__name__})")
    k = int(k)
    if k < 1:
        raise ValueError(f"{name} must be at least 1 (neighbours per point), got {k}")
    return k


def k_points_need(k: int) -> str:
    """The ``need`` text of :func:`as_points` for a search of ``k`` neighbours per point."""
    return f"k={k} neighbours per point need at least {{m}} (k must be below the number of points)"


def check_points(
    t: torch.Tensor, name: str = "x", coef: Optional[torch.Tensor] = None
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Raise on rows of ``t`` holding NaN/Inf, and return what the C++ core's pass over the points
    (``prepare_points``) gives besides: the (N,) int64 row hashes with the (D,) int64 CPU ``coef``
    (None without ``coef``) and the (D,) float64 column mean, so that a caller which needs them reads
    the points once (:func:`gelora.twonn`). Both None without the core (GPU, half precision, not built).
    """
    core = cpu_core(t)
    h = mean = None
    if core is not None:
        h, mean, bad = core.prepare_points(t.detach().contiguous().numpy(),
                                           None if coef is None else coef.numpy(),
                                           n_threads=torch.get_num_threads())
    else:
        bad = 0 if bool(torch.isfinite(t).all()) else int((~torch.isfinite(t)).any(dim=1).sum())
    if bad:
        raise ValueError(f"{name}: {bad} row(s) contain NaN or Inf; clean or mask them before estimating")
    return (None if h is None else torch.from_numpy(h)), (None if mean is None else torch.from_numpy(mean))


def power_of_two_scale(
    x: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    reduce: Optional[Callable[[float], float]] = None,
) -> float:
    """The power of two ``2^s`` to multiply the points ``x`` by before a search in ``dtype``, or 1.0.

    TwoNN only sees ratios of distances, and the kNN engines form squared distances and squared norms
    in float32 (FAISS and the Triton tiles whatever the input dtype; the C++ and torch engines for
    all but float64 input): values far from 1 overflow them (``1e30`` squared is beyond float32) or
    underflow them (``1e-30`` squared is below its smallest subnormal). Outside a comfortable range,
    ``2^-32 <= max|x| < 2^32`` for ``dtype`` float32 (``2^-256 <= max|x| < 2^256`` for float64, the
    float64 reference: a quarter of the exponent range on either side, so that squared norms stay far
    below overflow for any D under ``2^60`` and the squares of distances down to ``2^-31 max|x|`` stay
    normal), the points are scaled so that ``max|x|`` lies in ``[1/2, 1)``. Multiplying by a power of
    two is exact, as long as no value of ``x`` lands below the smallest normal number of its dtype
    (values below ``2^-126 max|x|`` in float32/bfloat16: far beneath the resolution of the largest
    values, and their squares are zero in float32 at any scale). In the range, 1.0: the common path
    makes no copy.

    Args:
        x: (N, D) points, any float dtype and device (N may be 0). float16 points, computed in float32,
            never need a scale (``65504^2`` and ``(2^-24)^2`` are well inside float32): not read.
        dtype: the narrowest dtype the distances are computed in.
        reduce: maps this process's ``max|x|`` to the one of all processes (an ``all_reduce`` of the
            max, :mod:`gelora.distributed`), so that every rank scales by the same power of two;
            called on every rank (an empty shard contributes 0), except for float16 points.

    Returns:
        ``2^s`` as a float, a normal number of the dtype of ``x`` (so at the ends of float32's range
        ``max|x|`` lands near, not in, ``[1/2, 1)``); 1.0 when ``x`` is in the range, all zero, empty,
        or holds NaN/Inf (the finiteness check rejects those).
    """
    fi, fx = torch.finfo(dtype), torch.finfo(x.dtype)
    # the range [2^lo, 2^hi): a quarter of the exponents of normal numbers of dtype on either side
    lo, hi = (math.frexp(fi.tiny)[1] - 1) // 4, math.frexp(fi.max)[1] // 4
    if math.frexp(fx.max)[1] <= hi and math.frexp(fx.tiny * fx.eps)[1] - 1 >= lo:
        return 1.0  # every value of the dtype is in the range (float16 in float32)
    top = 0.0
    if x.numel():
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            a = x.detach().numpy()  # numpy's min/max: ~8x faster than torch's on a busy 2-core box
            mn, mx = float(a.min()), float(a.max())
        else:
            mn, mx = (float(v) for v in torch.aminmax(x.detach()))
        top = max(abs(mn), abs(mx)) if math.isfinite(mn) and math.isfinite(mx) else math.inf
    if reduce is not None:
        top = float(reduce(top))
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    e = math.frexp(top)[1]  # top = m 2^e, 1/2 <= m < 1
    if lo <= e - 1 and e <= hi:  # 2^(e-1) <= top < 2^e inside [2^lo, 2^hi)
        return 1.0
    # 2^-e, kept a normal number of the dtype of x (the product is then exact)
    s = min(max(-e, math.frexp(fx.tiny)[1] - 1), math.frexp(fx.max)[1] - 1)
    return math.ldexp(1.0, s)


def unscale_distances(dist: torch.Tensor, scale: float) -> torch.Tensor:
    """Distances of points multiplied by ``scale`` (:func:`power_of_two_scale`) in the units of the
    points as given: ``dist / scale`` in float64 (exact, the division by a power of two), ``dist``
    itself when ``scale`` is 1. A caller that returns another dtype converts afterwards, where a
    distance beyond its range becomes ``inf`` and one below it a subnormal or 0."""
    if scale == 1.0:
        return dist
    return dist.to(torch.float64) / scale
