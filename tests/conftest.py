import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def import_core():
    """``gelora._C``, or skip the calling test module when it is not built (an error instead when
    ``GELORA_REQUIRE_EXT`` is set, as in CI, so that a broken build cannot pass as skipped tests)."""
    try:
        from gelora import _C
    except ImportError as exc:  # pragma: no cover - depends on the build
        if os.environ.get("GELORA_REQUIRE_EXT", "") in {"1", "true", "yes", "on"}:
            raise
        pytest.skip(f"gelora._C is not built: {exc}", allow_module_level=True)
    return _C


def usable_backends(device: str = "cpu"):
    """The kNN engines usable for ``device`` here. Under ``GELORA_REQUIRE_EXT`` (CI) the C++ core and
    FAISS must be among them on the CPU: a broken install fails the run instead of shrinking the list of
    engines every parametrised test runs on."""
    from gelora.neighbours.engines import all_backends

    probe = torch.zeros(8, 4, device=device)
    found = {n: b.not_supported_reasons(probe) for n, b in all_backends().items()}
    if device == "cpu" and os.environ.get("GELORA_REQUIRE_EXT", "") in {"1", "true", "yes", "on"}:
        missing = {n: r for n, r in found.items() if n in ("cpp", "faiss") and r}
        if missing:
            raise RuntimeError(f"GELORA_REQUIRE_EXT is set but these engines cannot run: {missing}")
    return [n for n, r in found.items() if not r]


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


def tiny_bert(seed: int = 0):
    """A 3-layer BERT encoder with random weights (hidden 32), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def tiny_llama(seed: int = 0):
    """A 3-layer Llama decoder with random weights (hidden 32, grouped KV heads), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """A 3-layer GPT-2 decoder with random weights (hidden 32), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


BUILDERS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


def free_port() -> int:
    """A free TCP port on the loopback interface, for a gloo process group in the tests."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo process group on the loopback interface (in a spawned test worker), one thread."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
