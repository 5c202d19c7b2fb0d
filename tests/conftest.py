"""Shared fixtures: tiny random Gemma checkpoints written by transformers (the oracle) in HF layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny shapes covering every attention layout; head_dim * heads != hidden_size in all of them but "mha".
SHAPES: dict[str, dict] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12),
}
BASE = dict(vocab_size=211, hidden_size=32, intermediate_size=72, num_hidden_layers=3, max_position_embeddings=256)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (norms included, which transformers initializes to 0) non-trivial random values.

    Large projections and a small embedding make the layers outweigh the residual stream, so greedy decoding
    of the tied head does not just repeat the last token: generation tests see varied continuations.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if "norm" in name else 0.05 if "embed" in name else 0.4
            p.copy_(torch.randn(p.shape, generator=g) * std)


# transformers' (config, causal LM, sequence classifier, base model) class names per generation
HF_CLASSES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "GemmaForSequenceClassification", "GemmaModel"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "Gemma2Model"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification", "Gemma3TextModel"),
}
TASKS = ("causal", "classify", "base")


def hf_class(family: str, task: str):
    import transformers

    return getattr(transformers, HF_CLASSES[family][1 + TASKS.index(task)])


def write_hf_checkpoint(
    directory: Path,
    task: str = "causal",
    seed: int = 0,
    max_shard_size: str | None = None,
    family: str = "gemma",
    **config,
) -> Path:
    """Save a random transformers model (`family` gemma | gemma2 | gemma3_text; `task` causal | classify | base)."""
    import transformers

    cfg = getattr(transformers, HF_CLASSES[family][0])(**{**BASE, **config})
    cls = hf_class(family, task)
    torch.manual_seed(seed)
    model = cls(cfg)
    randomize_(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def load_hf(directory: Path, task: str = "causal", family: str = "gemma"):
    """The oracle in fp32 with eager attention (the reference path; Gemma 2's soft-capping needs it)."""
    cls = hf_class(family, task)
    return cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session", params=sorted(SHAPES))
def causal_checkpoint(request, tmp_path_factory) -> Path:
    """A causal-LM checkpoint per attention layout; the MQA one is sharded to exercise the index."""
    shard = "40KB" if request.param == "mqa" else None
    path = tmp_path_factory.mktemp(f"causal-{request.param}")
    return write_hf_checkpoint(path, "causal", max_shard_size=shard, **SHAPES[request.param])


# ---- Ray: one local cluster per test session, shared by every Ray test ----------------------------------------

RAY_HEAD_CPUS, RAY_WORKER_NODES, RAY_WORKER_CPUS = 4, 2, 4  # logical CPUs: Ray packs actors by these counts


@pytest.fixture(scope="session")
def ray_cluster():
    """A local multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and two worker nodes, all on this
    machine) with Serve started on it, HTTP on a free loopback port (proxy on the head only)."""
    import socket

    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import serve_env

    with serve_env():  # the nodes' processes run Serve's request path as cluster/ starts Ray
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": RAY_HEAD_CPUS})
        for _ in range(RAY_WORKER_NODES):
            cluster.add_node(num_cpus=RAY_WORKER_CPUS)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    cluster.http_url = f"http://127.0.0.1:{port}"
    try:
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A tiny MQA causal LM with a trained tokenizer, in one HF directory (what a server loads)."""
    from gemma import GemmaTokenizer
    from tokenizer_fixtures import write_trained_tokenizer_json

    path = tmp_path_factory.mktemp("tiny-lm")
    tok = GemmaTokenizer.from_pretrained(write_trained_tokenizer_json(path))
    return write_hf_checkpoint(path, vocab_size=len(tok), num_attention_heads=4, num_key_value_heads=1, head_dim=12)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    """A tiny 3-label sequence classifier with named labels and a tokenizer."""
    from gemma import GemmaTokenizer
    from tokenizer_fixtures import write_trained_tokenizer_json

    path = tmp_path_factory.mktemp("tiny-classifier")
    tok = GemmaTokenizer.from_pretrained(write_trained_tokenizer_json(path))
    return write_hf_checkpoint(
        path, task="classify", vocab_size=len(tok), num_labels=3, pad_token_id=0,
        id2label={0: "negative", 1: "neutral", 2: "positive"}, label2id={"negative": 0, "neutral": 1, "positive": 2},
    )


# ---- the ingress without Ray (tests/fakes.py) -----------------------------------------------------------------


@pytest.fixture
def anyio_backend():
    return "asyncio"  # the anyio pytest plugin runs `async def` tests marked anyio on asyncio


@pytest.fixture(scope="module")
def lm():
    """A tiny model and tokenizer for a real engine behind the ingress."""
    from fakes import tiny_model_and_tokenizer

    return tiny_model_and_tokenizer()
