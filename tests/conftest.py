import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def usable_backends(device: str = "cpu"):
    from gelora.backends import all_backends

    probe = torch.zeros(8, 4, device=device)
    return [n for n, b in all_backends().items() if not b.not_supported_reasons(probe)]


@pytest.fixture(scope="session")
def cpu_backends():
    return usable_backends("cpu")


def subspace_points(n=2000, d=8, D=64, offset=5.0, seed=0, dtype=torch.float32):
    """n points of a random d-dimensional linear subspace of R^D (Gaussian coordinates), shifted by
    ``offset`` in every coordinate: a point cloud of known intrinsic dimension d."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64)).Q
    return (z @ basis.T + offset).to(dtype)
