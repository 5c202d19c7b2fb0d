"""Shared fixtures: tiny random Gemma checkpoints (tests/helpers/checkpoints.py), the Ray cluster, fake engines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.checkpoints import SHAPES, write_hf_checkpoint


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
    from tests.helpers.tokenizer_fixtures import write_trained_tokenizer_json

    path = tmp_path_factory.mktemp("tiny-lm")
    tok = GemmaTokenizer.from_pretrained(write_trained_tokenizer_json(path))
    return write_hf_checkpoint(path, vocab_size=len(tok), num_attention_heads=4, num_key_value_heads=1, head_dim=12)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    """A tiny 3-label sequence classifier with named labels and a tokenizer."""
    from gemma import GemmaTokenizer
    from tests.helpers.tokenizer_fixtures import write_trained_tokenizer_json

    path = tmp_path_factory.mktemp("tiny-classifier")
    tok = GemmaTokenizer.from_pretrained(write_trained_tokenizer_json(path))
    return write_hf_checkpoint(
        path, task="classify", vocab_size=len(tok), num_labels=3, pad_token_id=0,
        id2label={0: "negative", 1: "neutral", 2: "positive"}, label2id={"negative": 0, "neutral": 1, "positive": 2},
    )


# ---- the ingress without Ray (tests/helpers/fakes.py) -----------------------------------------------------------------


@pytest.fixture
def anyio_backend():
    return "asyncio"  # the anyio pytest plugin runs `async def` tests marked anyio on asyncio


@pytest.fixture(scope="module")
def lm():
    """A tiny model and tokenizer for a real engine behind the ingress."""
    from tests.helpers.fakes import tiny_model_and_tokenizer

    return tiny_model_and_tokenizer()
