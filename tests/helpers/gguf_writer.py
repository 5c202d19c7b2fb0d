"""Writing GGUF files for tests: random quantized blocks, and a tiny Gemma checkpoint as a GGUF with its
safetensors twin (the same weights, for loading-parity tests)."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from tests.helpers.checkpoints import randomize_

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
FAMILIES = {
    "gemma": dict(num_hidden_layers=2),
    "gemma2": dict(num_hidden_layers=2, sliding_window=8, attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                   query_pre_attn_scalar=32),
    "gemma3": dict(num_hidden_layers=6, sliding_window=8, rope_theta=1e6, query_pre_attn_scalar=32),
}
# our name -> (llama.cpp name, quant type written); norms are stored with +1, as llama.cpp's converter does
LAYER = {
    "input_layernorm": ("attn_norm", Q.F32), "self_attn.q_proj": ("attn_q", Q.Q4_0),
    "self_attn.k_proj": ("attn_k", Q.Q5_0), "self_attn.v_proj": ("attn_v", Q.Q8_0),
    "self_attn.o_proj": ("attn_output", Q.BF16), "mlp.gate_proj": ("ffn_gate", Q.Q4_K),
    "mlp.up_proj": ("ffn_up", Q.Q5_K), "mlp.down_proj": ("ffn_down", Q.Q6_K),
    "self_attn.q_norm": ("attn_q_norm", Q.F32), "self_attn.k_norm": ("attn_k_norm", Q.F16),
}
FIRST_NORM = {"gemma": {"post_attention_layernorm": ("ffn_norm", Q.F32)}}
SANDWICH = {"post_attention_layernorm": ("post_attention_norm", Q.F32), "pre_feedforward_layernorm": ("ffn_norm", Q.F32),
            "post_feedforward_layernorm": ("post_ffw_norm", Q.F32)}


def random_k_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant bytes with small finite fp16 scales (gguf can dequantize K-quants but not make them)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[..., -2:] = scales[..., :2]  # d is the block's last field
    else:
        raw[..., :4] = scales  # d and dmin lead the block
    return raw.reshape(rows, -1)


def encode(array: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return random_k_blocks(*array.shape, qtype, rng)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def write_gguf(path, family: str, sp_dir, extra_tensor: tuple | None = None, arch: str | None = None):
    """A random model of `family` as GGUF; returns our config and the dequantized state (the twin)."""
    import transformers

    from tests.helpers.checkpoints import HF_CLASSES

    hf_family = "gemma3_text" if family == "gemma3" else family
    spm = _sp_vocab(sp_dir)
    cfg = getattr(transformers, HF_CLASSES[hf_family][0])(vocab_size=len(spm["tokens"]), **SHAPE, **FAMILIES[family])
    model = getattr(transformers, HF_CLASSES[hf_family][1])(cfg)
    randomize_(model)
    state = {k: v.float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    rng = np.random.default_rng(0)
    names = {**LAYER, **(FIRST_NORM["gemma"] if family == "gemma" else SANDWICH)}

    w = gguf.GGUFWriter(path, arch or family)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(FAMILIES[family].get("rope_theta", 10000.0))
    if family != "gemma":
        w.add_sliding_window(cfg.sliding_window)
    if family == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_tokenizer_model("llama")
    w.add_token_list(spm["gguf_tokens"])
    w.add_token_scores(spm["scores"])
    w.add_token_types(spm["types"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    twin = {}
    for name, array in state.items():
        if name == "model.embed_tokens.weight":
            gguf_name, qtype = "token_embd.weight", Q.Q8_0
        elif name == "model.norm.weight":
            gguf_name, qtype = "output_norm.weight", Q.F32
        else:
            _, _, layer, *rest = name.split(".")
            gguf_name, qtype = names[".".join(rest[:-1])]
            gguf_name = f"blk.{layer}.{gguf_name}.weight"
        stored = array + 1.0 if name.endswith("norm.weight") else array
        data = encode(stored, qtype, rng)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(gguf_name, data)
        else:
            w.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        value = gguf.quants.dequantize(data, qtype).reshape(array.shape).astype(np.float32)
        twin[name] = torch.from_numpy(value - 1.0 if name.endswith("norm.weight") else value)
    if extra_tensor is not None:
        w.add_tensor(extra_tensor[0], extra_tensor[1], raw_shape=extra_tensor[1].shape, raw_dtype=extra_tensor[2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return twin


def _sp_vocab(sp_dir) -> dict:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((sp_dir / "tokenizer.model").read_bytes())
    tokens = [p.piece for p in proto.pieces]
    # llama.cpp writes whitespace-only pieces with real spaces
    gguf_tokens = [" " * len(t) if t and set(t) == {"▁"} and len(t) > 1 else t for t in tokens]
    return dict(tokens=tokens, gguf_tokens=gguf_tokens, scores=[p.score for p in proto.pieces],
                types=[int(p.type) for p in proto.pieces])
