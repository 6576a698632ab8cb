"""Input checking shared by every public entry point.

Everything that reaches a backend went through :func:`as_points`: a 2-D floating tensor (N, D) with
finite values, tokens already selected by the mask. Bad input fails here with a message that names the
problem, never later as a crash or a silent NaN.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_CORE = []


def cpu_core(t: torch.Tensor):
    """The C++ core module when it is built and ``t`` is a float32/float64 CPU tensor, else None.

    Its one-pass helpers (finiteness, row hash, float64 mean, centring, direct distances) replace
    chains of full-size torch temporaries; on a shared machine those chains cost far more than their
    arithmetic (every torch op is an OpenMP region that waits for descheduled threads)."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    if not _CORE:
        try:
            from . import _C  # noqa: PLC0415 - optional compiled extension
        except ImportError:
            _C = None
        _CORE.append(_C)
    return _CORE[0]


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
) -> torch.Tensor:
    """Return the point set of ``x`` as a 2-D floating tensor.

    Args:
        x: (N, D) or (B, T, D) tensor/array of float16, bfloat16, float32 or float64, on any device.
            (B, T, D) hidden states are flattened to (B*T, D) tokens.
        mask: optional boolean (B, T) (or (N,)) tensor/array; True keeps a token (an attention mask of
            0/1 integers is accepted too). Padding tokens are dropped before anything else.
        check_finite: reject NaN/Inf (one reduction over the data).
        min_points: fewest points the caller can work with.

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
        raise ValueError(
            f"{name}: {n} usable point(s); TwoNN needs at least {min_points} (two neighbours per point)"
        )
    if check_finite:
        check_points(t, name)
    return t


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
