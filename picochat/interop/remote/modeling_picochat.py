"""
picochat's GPT as a transformers model (remote code, written by `picochat export`). Load it with

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

The forward is picochat's (picochat/model.py), op for op in the same order and dtypes, with every
part a config field switches on:
- pre-norm blocks, parameter-free RMSNorm (after the embedding, before each sublayer, before the
  head), RoPE (halves rotated by −angle, base `rope_base`) then QK-norm, q and k times `qk_scale`,
  grouped-query heads, ReLU² MLP, untied head, logits `softcap·tanh(x/softcap)` in fp32, no biases;
- sliding windows: a layer whose letter in `window_pattern` (tiled, the last layer always L) is S
  sees itself and the `short_window` tokens before it;
- value embeddings on alternating layers (the last included), added to v through a per-head gate
  3·sigmoid(W·x[:12]);
- lambdas: x <- resid_lambdas[i]·x + x0_lambdas[i]·x0 before block i (x0: the embedding);
- smear: x_t += smear_lambda·sigmoid(W·x_t[:24])·x_{t-1} on the normalized embeddings;
- backout: backout_lambda × the residual after block n_layer//2 is subtracted before the head.

Generation: keys and values go into transformers' DynamicCache; masks (causal, windows, left
padding) are built from positions at every forward. Smear needs the token before the first new
one, which `prepare_inputs_for_generation` passes as `previous_ids`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_picochat import PicochatConfig

VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24    # the smear gate reads the first 24 channels of the token's embedding
# The output field that carries the cache: "cache" in transformers 5.x, "past_key_values" before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def norm(x):
    """RMSNorm without a gain, epsilon float32's machine epsilon (F.rms_norm's default)."""
    return F.rms_norm(x, (x.size(-1),))


def rotate(x, cos, sin):
    """RoPE on x (B, T, H, D): (first half, second half) rotated by −angle."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def layer_windows(config):
    """Per layer: None for full causal attention, else how many earlier tokens it sees."""
    pattern = config.window_pattern.upper()
    tiled = [pattern[i % len(pattern)] for i in range(config.n_layer)]
    tiled[-1] = "L"
    return [config.short_window if c == "S" else None for c in tiled]


def has_value_embed(config, layer):
    return config.value_embeds and layer % 2 == (config.n_layer - 1) % 2


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_scale = config.qk_scale
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if has_value_embed(config, layer_idx):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding, scaled per head by a gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))  # RoPE first, then QK-norm
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv_head != self.n_head:  # query heads h·G .. h·G+G-1 read key/value head h
            groups = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask, cache):
        x = x + self.attn(norm(x), ve, cos, sin, mask, cache)
        return x + self.mlp(norm(x))


class PicochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PicochatConfig
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.value_embeds:
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                               for i in range(config.n_layer) if has_value_embed(config, i)})
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.windows = layer_windows(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def rotary(self, positions, dtype):
        """cos, sin (B, T, 1, D/2) at these positions (B, T), computed as picochat's tables are."""
        d = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                                 device=positions.device) / d))
        angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
        return angles.cos().to(dtype).unsqueeze(2), angles.sin().to(dtype).unsqueeze(2)

    def masks(self, past, T, attention_mask, device):
        """{window: (B or 1, 1, T, past+T) bool, True = visible}. Key j is visible to query i (both
        indices into the cache) when j <= i, i - j <= window, and j is not padding; a padding query
        sees itself, so no row is empty."""
        q = torch.arange(past, past + T, device=device).unsqueeze(1)
        k = torch.arange(past + T, device=device).unsqueeze(0)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.size(1) != past + T:
                raise ValueError(f"attention_mask must be (batch, {past + T}): 1 for tokens, 0 for padding; "
                                 f"got shape {tuple(attention_mask.shape)}")
            valid = attention_mask.bool().unsqueeze(1)  # (B, 1, past+T)
        out = {}
        for window in set(self.windows):
            mask = k <= q
            if window is not None:
                mask = mask & (k >= q - window)
            if attention_mask is not None:
                mask = (mask.unsqueeze(0) & valid) | (k == q)
            out[window] = mask.view(-1, 1, T, past + T)
        return out

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, previous_ids=None, logits_to_keep=0, **kwargs):
        """input_ids (B, T) -> logits (B, T, vocab) in fp32. With a cache, input_ids are the tokens
        after those cached, and `previous_ids` (B, 1) the token before them (for smear)."""
        c = self.config
        if input_ids is None:
            raise ValueError("pass input_ids: value embeddings and smear look the tokens up (inputs_embeds is not enough)")
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0).expand(B, T)
        cos, sin = self.rotary(position_ids, self.lm_head.weight.dtype)
        masks = self.masks(past, T, attention_mask, input_ids.device)

        x = norm(self.transformer.wte(input_ids))
        if c.smear:  # blend in the previous token's normalized embedding (none at position 0)
            if previous_ids is None and past > 0:
                raise ValueError("smear needs the token before input_ids: pass previous_ids (generate does)")
            first = norm(self.transformer.wte(previous_ids)) if previous_ids is not None else torch.zeros_like(x[:, :1])
            prev = torch.cat([first, x[:, :-1]], dim=1)
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            x = x + gate * prev * (position_ids > 0).unsqueeze(-1).to(x.dtype)
        x0, mid = x, None
        for i, block in enumerate(self.transformer.h):
            if c.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if has_value_embed(c, i) else None
            x = block(x, ve, cos, sin, masks[self.windows[i]], cache)
            if c.backout and i == c.n_layer // 2:
                mid = x
        if mid is not None:
            x = x - self.backout_lambda * mid
        x = norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x).float()
        logits = c.softcap * torch.tanh(logits / c.softcap)
        loss = None
        if labels is not None:  # next-token loss, -100 ignored (transformers' convention)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """transformers' own preparation (it cuts input_ids to the uncached tokens), plus the token
        before those, which smear blends into the first of them."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if new is not None and 0 < new.size(1) < input_ids.size(1):
            inputs["previous_ids"] = input_ids[:, -new.size(1) - 1:-new.size(1)]
        return inputs
