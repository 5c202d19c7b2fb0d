"""Gemma decoder models: `GemmaModel`, `GemmaForCausalLM`, `GemmaForSequenceClassification`.

One code path for Gemma 1, 2 and 3 (text), driven by the config: Gemma 2 adds sandwich norms, soft-capping
and alternating sliding-window layers; Gemma 3 drops the soft-capping, adds q/k norms and a RoPE base per
layer type. Numerically the same as transformers' Gemma, Gemma2 and Gemma3Text on the same weights
(tests/gemma/test_model_parity.py, tests/gemma/test_gemma23_parity.py).
The forward signatures are transformers' (`input_ids`/`inputs_embeds`, `attention_mask`, `position_ids`,
`past_key_values`, `labels`, `use_cache`, `output_attentions`, `output_hidden_states`, `return_dict`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gemma.cache import KVCache
from gemma.config import GemmaConfig
from gemma.layers import (
    GemmaMLP, RMSNorm, ScaledEmbedding, apply_rope, attention_mask_bias, rope_cos_sin, rope_inv_freq,
)
from gemma.outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from gemma.parallel import (
    SINGLE, ColumnParallelLinear, ParallelLMHead, RowParallelLinear, TPGroup, kv_heads_of_rank, split,
)
from gemma.weights import PretrainedMixin


class PagedAttention(Protocol):
    """The serving engine's description of a batch over its paged KV cache (gemma.engine.model_runner).

    Given one layer's flat queries/keys/values (1, H, T, D) for all scheduled tokens of all sequences, it
    writes the keys/values into the cache and returns the attention output (1, H, T, D), calling `attend`
    (the layer's `attend_slots`) on each group of sequences' queries with the cache slots of their keys.
    """

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Any) -> torch.Tensor: ...


class GemmaAttention(nn.Module):
    """Self-attention; under tensor parallelism each rank holds `num_heads` of the query heads and the kv heads
    they read (replicated when there are fewer kv heads than ranks), and o_proj all-reduces."""

    def __init__(self, config: GemmaConfig, layer_idx: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        D = self.head_dim = config.head_dim
        q_start, self.num_heads = split(config.num_attention_heads, tp, "num_attention_heads")
        kv_start, self.num_kv_heads = kv_heads_of_rank(config.num_key_value_heads, tp)
        self.scaling = config.attention_scale  # Gemma 2/3: query_pre_attn_scalar ** -0.5, not head_dim's
        self.softcap = config.attn_logit_softcapping
        self.dropout = config.attention_dropout
        C, bias = config.hidden_size, config.attention_bias
        q_rows, kv_rows = (q_start * D, self.num_heads * D), (kv_start * D, self.num_kv_heads * D)
        self.q_proj = ColumnParallelLinear(C, config.num_attention_heads * D, tp, bias, rows=q_rows)
        self.k_proj = ColumnParallelLinear(C, config.num_key_value_heads * D, tp, bias, rows=kv_rows)
        self.v_proj = ColumnParallelLinear(C, config.num_key_value_heads * D, tp, bias, rows=kv_rows)
        self.o_proj = RowParallelLinear(config.num_attention_heads * D, C, tp, bias)
        if config.qk_norm:  # Gemma 3: RMSNorm over each head's query and key, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: KVCache | None = None,
        output_attentions: bool = False,
        paged: PagedAttention | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, *rope), self.rotate(k, *rope)
        if paged is not None:  # the engine's paged cache writes k/v and attends sequence by sequence
            out, probs = paged.attention(self.layer_idx, q, k, v, self.attend_slots), None
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D)
            out, probs = self.attend(q, k, v, mask, output_attentions)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out), probs

    # project_qkv, rotate, attend and attend_slots are where gemma.cpu.fastpath substitutes its kernels (same maths).

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(q k^T * scale [soft-capped] + mask) v for q (B, H, T, D), k/v (B, Hkv, S, D), mask (B, 1, T, S)."""
        dropout = self.dropout if self.training else 0.0
        groups = self.num_heads // self.num_kv_heads
        if output_attentions or self.softcap:  # eager: the weights come out; SDPA cannot soft-cap
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
            scores = q @ k.transpose(-1, -2) * self.scaling  # (B, H, T, S)
            if self.softcap:  # Gemma 2: cap * tanh(scores / cap), before the mask
                scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores + mask
            probs = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), dropout, self.training)
            return probs @ v, probs
        B, H, T, D = q.shape
        if T == 1 and groups > 1:
            # decode: one query per head; the heads sharing a kv head become that head's query rows, one
            # (B, Hkv, G, D) x (B, Hkv, S, D) product instead of a broadcast per head (~10x faster on CPU)
            q = q.view(B, self.num_kv_heads, groups, D)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling)
            return out.reshape(B, H, 1, D), None  # some CUDA kernels return it non-contiguous
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling, enable_gqa=groups > 1
        )
        return out, None

    def attend_slots(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, allowed: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of q (n, H, Q, D) over keys and values kept in pools (P, Hkv, D), at `slots` (n, K) (the
        engine's paged cache); `allowed` (n, 1, Q, K) bool and `bias` its additive form. Returns (n, H, Q, D)."""
        k, v = k_pool[slots].transpose(1, 2), v_pool[slots].transpose(1, 2)  # (n, Hkv, K, D)
        groups = self.num_heads // self.num_kv_heads
        if q.is_cuda and q.shape[2] > 1 and groups > 1 and not self.softcap:
            # Several queries per row under a mask: SDPA's memory-efficient kernel takes a mask but not
            # enable_gqa (with both, SDPA falls back to the math kernel or to cuDNN's, which builds a plan per
            # new shape), so the kv heads are expanded here; the engine's runner picks the kernels on a GPU.
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)
        return self.attend(q, k, v, bias)[0]


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config, layer_idx, tp)
        self.mlp = GemmaMLP(config.hidden_size, config.intermediate_size, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sandwich = config.sandwich_norms
        if self.sandwich:  # Gemma 2/3 (transformers' Gemma2DecoderLayer)
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: KVCache | None = None,
        output_attentions: bool = False,
        paged: PagedAttention | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, probs = self.self_attn(self.input_layernorm(x), rope, mask, cache, output_attentions, paged)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:  # Gemma 1: its "post_attention_layernorm" is the norm in front of the MLP
            x = x + h
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, probs


class GemmaPreTrainedModel(PretrainedMixin, nn.Module):
    """Shared init and helpers; `from_pretrained`/`save_pretrained` come from `PretrainedMixin`."""

    def __init__(self, config: GemmaConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens  # head models; GemmaModel returns its own

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init as transformers does: normal(0, initializer_range), zero biases and norms, zero pad row."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.zero_()


class GemmaModel(GemmaPreTrainedModel):
    """The decoder stack without a head; `last_hidden_state` is after the final norm."""

    def __init__(self, config: GemmaConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, tp)
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size, tp, config.pad_token_id)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        paged: PagedAttention | None = None,
    ) -> BaseModelOutputWithPast | tuple[Any, ...]:
        """`paged` is the serving engine's batch over its paged KV cache: all sequences' tokens flattened into
        one row (1, T) with their `position_ids`; then no `KVCache` or `attention_mask` is used."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if paged is not None and position_ids is None:
            raise ValueError("a paged batch needs position_ids")
        if use_cache is None:
            use_cache = self.config.use_cache and paged is None
        if use_cache and past_key_values is None:
            past_key_values = KVCache.from_config(self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device)[None].expand(B, T)
        masks = {}
        for i, layer_type in enumerate(self.config.layer_types or ["full_attention"]):
            if layer_type in masks:
                continue
            # a sliding layer's cache holds only its window's tail: its first kept slot
            key_start = past_len - past_key_values.kept(i) if past_key_values is not None else 0
            masks[layer_type] = None if paged is not None else attention_mask_bias(
                attention_mask, B, T, past_len, x.dtype, x.device, causal=not self.config.use_bidirectional_attention,
                window=self.config.layer_window(i), key_start=key_start,
            )
        ropes = self.rope_tables(position_ids, x.dtype)

        hidden_states: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            hidden_states.append(x)
            layer_type = self.config.layer_type(i)
            x, probs = layer(x, ropes[layer_type], masks[layer_type], past_key_values, bool(output_attentions), paged)
            if probs is not None:
                attentions.append(probs)
        x = self.norm(x)
        hidden_states.append(x)  # transformers' convention: the last entry is after the final norm

        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict is not False else out.to_tuple()

    def rope_types(self) -> list[str]:
        """The layer types that have their own rope tables, in the order `rope_tables` gives them."""
        return list(dict.fromkeys(self.config.layer_types or ["full_attention"]))

    def rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos and sin (B, T, D) for `position_ids` (B, T), per layer type (Gemma 3: a RoPE base and scaling each)."""
        ropes = {}
        for layer_type in self.rope_types():
            inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_base(layer_type), position_ids.device)
            ropes[layer_type] = rope_cos_sin(position_ids, inv_freq / self.config.rope_factor(layer_type), dtype)
        return ropes


class GemmaForCausalLM(GemmaPreTrainedModel):
    """Decoder plus LM head; the head is the embedding matrix when `tie_word_embeddings` (all released Gemmas)."""

    def __init__(self, config: GemmaConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, tp)
        self.model = GemmaModel(config, tp)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp)
        if not self.lm_head.weight.is_meta:
            self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        paged: PagedAttention | None = None,
    ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        """`labels` (B, T) give the shifted next-token loss, ignoring -100. `logits_to_keep=k` computes logits
        for the last k positions only; a tensor of positions computes them for those (the engine's sampled
        tokens). `paged`: see `GemmaModel.forward`."""
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
            use_cache, output_attentions, output_hidden_states, return_dict=True, paged=paged,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.compute_logits(h)  # (B, T, V)
        loss = None
        if labels is not None:
            # token t predicts label t+1; the last position has nothing to predict
            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten().to(logits.device), ignore_index=-100)
        result = CausalLMOutputWithPast(loss, logits, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()

    def compute_logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head (and Gemma 2's soft-capping) over final hidden states h (..., C). `out`, an fp32 tensor of
        the logits' shape, receives them as `logits.float()` would give them (the serving engine reuses one buffer,
        which a CPU kernel writes directly)."""
        cap = self.config.final_logit_softcapping
        if out is not None and not cap and self.tp.size == 1:
            return self.lm_head.matmul(h, out=out)
        logits = self.lm_head(h)
        if cap:  # Gemma 2: cap * tanh(logits / cap)
            logits = torch.tanh(logits / cap) * cap
        return logits if out is None else out.copy_(logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, **kwargs: Any) -> torch.LongTensor:
        """KV-cached decoding; see `gemma.generation.generate` for the arguments."""
        from gemma.generation import generate

        return generate(self, input_ids, **kwargs)


class GemmaForSequenceClassification(GemmaPreTrainedModel):
    """Decoder plus a bias-free `score` head read at each row's last non-padding token."""

    def __init__(self, config: GemmaConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, tp)
        self.model = GemmaModel(config, tp)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)  # tiny: replicated
        if not self.score.weight.is_meta:
            self.init_weights()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutputWithPast | tuple[Any, ...]:
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
            use_cache, output_attentions, output_hidden_states, return_dict=True,
        )
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        B, T = logits.shape[:2]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("batch size > 1 needs config.pad_token_id to find each row's last token")
        if input_ids is not None and pad is not None:
            # rightmost non-pad token, so left and right padding both work; a row with no padding -> last token
            positions = torch.arange(T, device=logits.device)
            last = (positions * (input_ids != pad).to(logits.device)).argmax(-1)
        else:
            last = torch.full((B,), T - 1, device=logits.device)  # inputs_embeds: padding can't be seen
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)
        loss = None if labels is None else self._loss(pooled, labels.to(pooled.device))
        result = SequenceClassifierOutputWithPast(loss, pooled, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        n = self.config.num_labels
        if problem is None:  # transformers' inference of the problem from the labels
            if n == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return F.mse_loss(pooled.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(pooled, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, n), labels.view(-1), ignore_index=-100)
        return F.binary_cross_entropy_with_logits(pooled, labels)
