"""Layer-Condensed KV: a Llama whose every layer attends to the top layer's keys and values.

Wu & Tu, "Layer-Condensed KV Cache for Efficient Inference of Large Language Models", ACL 2024,
arXiv 2405.10637. Queries of all layers are paired with the K/V of the top layer only, so the
cache holds one layer's K/V instead of ``num_hidden_layers`` (the other layers have no
``k_proj``/``v_proj`` at all). A token's top-layer K/V exist only once the token has been through
every layer, so each token attends to the *earlier* tokens' top-layer K/V and to one dummy
key/value of zeros (the paper's dummy for the first token, here always present: a logit of 0 on a
value of 0, which keeps every row's softmax defined), never to its own.

Semantics, one for training, prompts and generation:

- generating (one new token): exact; the token attends to the cached top-layer K/V of all
  earlier tokens;
- several new tokens at once (a prompt, or training): the paper's parallel iterations. The new
  tokens' top-layer K/V start at zero; each of ``config.lckv_iterations`` passes runs every layer
  over all new tokens against the previous pass's estimate and yields a new one; the logits and the
  cached K/V are the last pass's. After ``k`` passes the first ``k`` new tokens are exact (token
  ``i`` needs only tokens before it), so a prompt of at most ``lckv_iterations`` tokens is exact and
  a longer one is the paper's approximation, the same in training and at inference. Training
  back-propagates through the last ``lckv_grad_iterations`` passes only (the paper's gradient
  stopping).

No warm-up layers (the paper's variant that keeps standard attention in a few layers): the cache
holds exactly one layer. Registered with transformers' Auto classes as ``kvplug_lckv`` when
``kvplug.hf`` is imported, so ``AutoModelForCausalLM.from_pretrained`` loads a checkpoint with no
``trust_remote_code``. Batches must be unpadded (one line refuses a padding mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvplug.errors import SpecError


class LckvConfig(LlamaConfig):
    """A :class:`LlamaConfig` plus the LCKV iteration counts."""

    model_type = "kvplug_lckv"

    def __init__(self, lckv_iterations: int = 3, lckv_grad_iterations: int = 2, **kwargs):
        if lckv_iterations < 1 or not 1 <= lckv_grad_iterations <= lckv_iterations:
            raise SpecError(f"kvplug_lckv: lckv_iterations={lckv_iterations}, lckv_grad_iterations="
                            f"{lckv_grad_iterations}: need 1 <= grad iterations <= iterations")
        self.lckv_iterations = lckv_iterations
        self.lckv_grad_iterations = lckv_grad_iterations
        super().__init__(**kwargs)


class LckvForCausalLM(LlamaForCausalLM):
    """Llama with Layer-Condensed KV (see the module docstring); the cache holds layer 0's slot only."""

    config_class = LckvConfig
    kvplug_own_cache = True  # kvplug's tools (``kvplug eval``) run it with "none" only, on its DynamicCache

    def __init__(self, config: LckvConfig):
        super().__init__(config)
        for layer in self.model.layers[:-1]:  # only the top layer makes keys and values
            del layer.self_attn.k_proj
            del layer.self_attn.v_proj
        self.post_init()

    def _layers(self, h, cos, sin, past_k, past_v, new_k, new_v):
        """One pass of every layer over the new tokens' hidden states ``h`` ``[B, n, hidden]``
        against ``[dummy, past, new tokens before each query]``; returns the final hidden states
        and the top layer's K/V of the new tokens ``[B, Hkv, n, D]`` (keys rotated)."""
        cfg = self.config
        b, n, _ = h.shape
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dummy = torch.zeros(b, hkv, 1, d, dtype=h.dtype, device=h.device)
        keys = torch.cat([dummy, past_k.to(h.dtype), new_k[:, :, : n - 1].to(h.dtype)], 2)
        values = torch.cat([dummy, past_v.to(h.dtype), new_v[:, :, : n - 1].to(h.dtype)], 2)
        p = past_k.shape[2]
        mask = None
        if p and n > 1:  # query i sees the dummy, every past token and new tokens before it
            mask = torch.arange(keys.shape[2], device=h.device)[None, :] <= p + torch.arange(n, device=h.device)[:, None]
        top_k = top_v = None
        for li, layer in enumerate(self.model.layers):
            a = layer.self_attn
            r = layer.input_layernorm(h)
            if li == len(self.model.layers) - 1:
                top_v = a.v_proj(r).view(b, n, hkv, d).transpose(1, 2)
                top_k = a.k_proj(r).view(b, n, hkv, d).transpose(1, 2)
                top_k = apply_rotary_pos_emb(top_k, top_k, cos, sin)[0]
            q = a.q_proj(r).view(b, n, hq, d).transpose(1, 2)
            q = apply_rotary_pos_emb(q, q, cos, sin)[0]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and n > 1,
                                               scale=a.scaling, enable_gqa=hq != hkv)
            h = h + a.o_proj(o.transpose(1, 2).reshape(b, n, hq * d))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.norm(h), top_k, top_v

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep=0,
                **kwargs):
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise SpecError("kvplug_lckv: padded batches are not supported (run prompts of one length, or one at a time)")
        if past_key_values is not None and not isinstance(past_key_values, DynamicCache):
            raise SpecError(f"kvplug_lckv: the cache must be transformers' DynamicCache (one layer of K/V), "
                            f"not {type(past_key_values).__name__}")
        cfg = self.config
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n, _ = h.shape
        if use_cache is None:
            use_cache = cfg.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        p = past_key_values.get_seq_length(0) if past_key_values is not None else 0
        if p:
            past_k, past_v = past_key_values.layers[0].keys, past_key_values.layers[0].values
        else:
            past_k = past_v = torch.zeros(b, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=h.dtype, device=h.device)
        if position_ids is None:
            position_ids = torch.arange(p, p + n, device=h.device)[None].expand(b, n)
        cos, sin = self.model.rotary_emb(h, position_ids)
        new_k = new_v = torch.zeros(b, cfg.num_key_value_heads, n, cfg.head_dim, dtype=h.dtype, device=h.device)
        passes = 1 if n == 1 else cfg.lckv_iterations
        grad = torch.is_grad_enabled()
        for it in range(passes):  # gradients through the last lckv_grad_iterations passes only
            with torch.set_grad_enabled(grad and it >= passes - cfg.lckv_grad_iterations):
                out, new_k, new_v = self._layers(h, cos, sin, past_k, past_v, new_k, new_v)
        if use_cache:
            past_key_values.update(new_k, new_v, 0)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(out[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)


def register() -> None:
    """Make ``kvplug_lckv`` checkpoints loadable through transformers' Auto classes (idempotent)."""
    try:
        AutoConfig.register(LckvConfig.model_type, LckvConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(LckvConfig, LckvForCausalLM)
    except ValueError:
        pass
