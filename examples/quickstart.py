"""The README's example: build a model, run_with_cache, read the shift coefficients."""

import torch

from kvshift_lens import HookedKVShiftTransformer, KVShiftConfig

cfg = KVShiftConfig(d_model=64, d_head=16, n_layers=1, n_ctx=64, d_vocab=64, attn_only=True,
                    shift_init="uniform", device="cpu")
model = HookedKVShiftTransformer(cfg, generator=torch.Generator().manual_seed(0)).eval()
tokens = torch.randint(0, 64, (2, 32))
logits, cache = model.run_with_cache(tokens)          # an ActivationCache, TransformerLens-style
print(cache["blocks.0.attn.hook_k_shifted"].shape)     # [batch, pos, kv_head, d_head]
print(cache["pattern", 0].shape)                       # [batch, head, query_pos, key_pos]
coeffs = model.shift_coefficients()                    # [layer, kv_head, lag] per shifted projection
alpha1, alpha2 = coeffs["k"][0, :, 0], coeffs["k"][0, :, 1]
print(alpha1, alpha2, coeffs.to_pandas().head())
