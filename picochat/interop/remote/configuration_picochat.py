"""
The configuration of picochat's GPT for transformers (remote code, written by `picochat export`).

Its fields are picochat's GPTConfig, under picochat's names; transformers' usual names
(hidden_size, num_hidden_layers, ...) are aliases of them.
"""
from transformers import PretrainedConfig


class PicochatConfig(PretrainedConfig):
    model_type = "picochat"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    def __init__(self, sequence_len=2048, vocab_size=65536, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 window_pattern="L", short_window=0, value_embeds=False, lambdas=False, smear=False,
                 backout=False, rope_base=10000.0, qk_scale=1.0, softcap=15.0, tie_word_embeddings=False,
                 **kwargs):
        self.sequence_len = sequence_len        # the context the model was trained on
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head              # grouped-query attention when below n_head
        self.n_embd = n_embd
        self.window_pattern = window_pattern    # per layer, tiled, last layer L: S sees short_window earlier tokens
        self.short_window = short_window
        self.value_embeds = value_embeds        # value embeddings on alternating layers, the last one included
        self.lambdas = lambdas                  # x <- resid_lambdas[i]·x + x0_lambdas[i]·x0 before each block
        self.smear = smear                      # each token's embedding blends in its predecessor's
        self.backout = backout                  # subtract a learned part of the middle residual before the head
        self.rope_base = rope_base
        self.qk_scale = qk_scale                # q and k multiplied by this after QK-norm
        self.softcap = softcap                  # logits = softcap·tanh(logits/softcap)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
