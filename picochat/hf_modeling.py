"""picochat's GPT as a Hugging Face `transformers` model, for exports that the built-in `nanochat` model type
cannot express (per-layer residual scalars, value embeddings and their gate, sliding windows, rotary tables rounded
to bf16, the smear, the backout, a QK scale).

`picochat export --hf` copies this file into the export folder as modeling_picochat.py and points config.json's
auto_map at it, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` runs it. It must
therefore stand alone: it imports torch and transformers only, never picochat. Parameter names are the
same as in picochat/model.py, so the checkpoint's tensors load unchanged, and the forward pass does the same
operations in the same order (the export is held to picochat's logits in tests/test_export.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig


class PicochatConfig(PreTrainedConfig):
    model_type = "picochat"

    def __init__(self, vocab_size=32768, hidden_size=768, num_hidden_layers=12, *, num_attention_heads=6,
                 num_key_value_heads=6, max_position_embeddings=2048, rope_base=100_000.0, softcap=15.0,
                 window_sizes=None, value_embed_layers=(), ve_gate_channels=32, ve_gate_scale=2.0, resid_scalars=True,
                 rope_bf16=False, smear=False, backout_layer=None, qk_scale=1.0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_base = rope_base
        self.softcap = softcap
        # attention window per layer in tokens, None = full causal (picochat's GPTConfig.window_sizes())
        self.window_sizes = list(window_sizes) if window_sizes is not None else [None] * num_hidden_layers
        self.value_embed_layers = list(value_embed_layers)
        self.ve_gate_channels = ve_gate_channels
        self.ve_gate_scale = ve_gate_scale
        self.resid_scalars = resid_scalars
        self.rope_bf16 = rope_bf16  # the rotary tables rounded to bf16, as a model imported from the reference
        self.smear = smear  # each token's embedding gains a gated share of the previous token's
        self.backout_layer = backout_layer  # None, or the layer whose output is partly subtracted before the final norm
        self.qk_scale = qk_scale  # q and k multiplied by this after QK-norm
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


SMEAR_CHANNELS = 24  # the smear gate reads this many leading channels of the embedding, as in picochat


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    # x: (B, T, H, D); the halves rotate as pairs (i, i + D/2), as in picochat
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: PicochatConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.window_sizes[layer]
        C = config.hidden_size
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        self.ve_gate_channels, self.ve_gate_scale = config.ve_gate_channels, config.ve_gate_scale
        self.qk_scale = config.qk_scale
        has_ve = layer in config.value_embed_layers
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, cos, sin, *, ve, cache, past, pad_mask):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        if self.n_kv_head != self.n_head:  # key/value head h serves query heads h*g .. h*g+g-1
            g = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        L = k.shape[2]
        windowed = self.window is not None and self.window < L
        if past == 0 and pad_mask is None and not windowed:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            qi = past + torch.arange(T, device=x.device)[:, None]
            kj = torch.arange(L, device=x.device)[None, :]
            mask = kj <= qi
            if windowed:
                mask = mask & (qi - kj < self.window)
            mask = mask[None, None]
            if pad_mask is not None:
                # padding keys are invisible; every query still sees itself, so rows of padding stay finite
                mask = (mask & pad_mask[:, None, None, :]) | (kj == qi)[None, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: PicochatConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, *, ve, cache, past, pad_mask):
        x = x + self.attn(norm(x), cos, sin, ve=ve, cache=cache, past=past, pad_mask=pad_mask)
        return x + self.mlp(norm(x))


class PicochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PicochatConfig
    base_model_prefix = "picochat"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: PicochatConfig):
        super().__init__(config)
        C, kv_dim = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.wte = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in config.value_embed_layers})
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout_layer is not None:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        # only for a fresh model or tensors missing from a checkpoint (an export has none); the residual
        # scalars start as the identity (ones and zeros), the smear and backout off (zeros), from __init__
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, prev_ids=None, **kwargs):
        """prev_ids (batch,): each row's token before input_ids, which a model that smears needs after the first
        cached forward (the cache holds keys and values, not tokens); generate() passes it."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("picochat needs input_ids (value embeddings are looked up by token id)")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        pad_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] != past + T:
                raise ValueError(f"attention_mask must be 2-D (batch, {past + T}), got {tuple(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                pad_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=input_ids.device))[None].expand(B, T)
        # rotary angles in fp32 as picochat computes them, then cast to the compute dtype
        d = self.config.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.float32, device=input_ids.device) / d
        inv_freq = 1.0 / (self.config.rope_base ** exponents)
        freqs = position_ids.float()[..., None] * inv_freq
        x = norm(self.wte(input_ids))
        if self.config.smear:
            x = self.smear(x, prev_ids, past, pad_mask)
        cos, sin = freqs.cos(), freqs.sin()
        if self.config.rope_bf16:
            cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
        cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.config.resid_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, ve=ve, cache=cache, past=past, pad_mask=pad_mask)
            if i == self.config.backout_layer:
                mid = x
        if self.config.backout_layer is not None:
            x = x - self.backout_lambda.to(x.dtype) * mid
        x = norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        sc = self.config.softcap
        logits = self.lm_head(x).float()
        logits = sc * torch.tanh(logits / sc)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{cache_field: cache})

    def smear(self, x, prev_ids, past, pad_mask):
        """picochat's smear: x (B, T, C) the normed embeddings of the tokens at past..past+T-1; each gains
        smear_lambda * sigmoid(smear_gate . x[:24]) times its predecessor's normed embedding. The first token of a
        sequence, and the first after left padding, gains nothing (its predecessor counts as zeros, as in picochat's
        decoding)."""
        T = x.shape[1]
        if past == 0:
            prev = x[:, :-1]
        elif prev_ids is None:
            raise ValueError("picochat's smear needs prev_ids (each row's token before input_ids) to continue from "
                             "a cache: generate() passes them, or run the whole sequence without a cache")
        else:
            prev = torch.cat([norm(self.wte(prev_ids))[:, None], x[:, :-1]], dim=1)
        n = prev.shape[1]  # T, or T - 1 at the start of the sequence
        if pad_mask is not None:
            prev = prev * pad_mask[:, past + T - n - 1:past + T - 1, None].to(x.dtype)
        tail = x[:, T - n:]
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(tail[..., :SMEAR_CHANNELS]))
        return torch.cat([x[:, :T - n], tail + gate * prev], dim=1)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        # generate() keeps every token and feeds the model those its cache lacks: the one before them is the
        # smear's predecessor of the first (input_ids is reordered with the cache under beam search, and cropped
        # with it in assisted decoding, so it is always the right one)
        start = input_ids.shape[1] - inputs["input_ids"].shape[1]
        if self.config.smear and start > 0:
            inputs["prev_ids"] = input_ids[:, start - 1]
        return inputs
