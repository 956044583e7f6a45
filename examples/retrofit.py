"""Retrofit a pretrained model with KV shifting: convert it at identity, check it still computes the same
logits, fine-tune only the shift coefficients, and see which heads take the shift up.

Runs offline on a tiny randomly initialised GPT-2 built from a config. With network access (or a
local Hugging Face cache) use a real checkpoint instead, e.g.::

    from kvshift_lens.convert import from_hf
    model = from_hf("gpt2")                      # AutoModelForCausalLM + AutoTokenizer by name
    model = from_hf("EleutherAI/pythia-70m")     # GPT-NeoX; Llama-family checkpoints work the same
    # or load it yourself and hand it over, with its tokenizer:
    # hf = AutoModelForCausalLM.from_pretrained(path); model = from_hf(hf, tokenizer=tok)

Usage: python examples/retrofit.py [--steps 60] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvshift_lens.convert import freeze_all_but_shift, from_hf, spec_for_model
from kvshift_lens.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--run-dir", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args()

    # 1. The model the user supplies (here: a tiny random GPT-2, eval mode, eager attention).
    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32,
                        initializer_range=0.2, bos_token_id=0, eos_token_id=None)
    hf_cfg._attn_implementation = "eager"
    hf = GPT2LMHeadModel(hf_cfg).eval()

    # 2. Convert: keys and values shifted, coefficients at identity (alpha1 = beta1 = 1, else 0).
    model = from_hf(hf, shift=("k", "v"))
    tokens = torch.randint(0, 50, (4, 32))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    print(f"max |logits - HF logits| at identity: {diff:.2e}")
    assert diff < 1e-4

    # 3. Fine-tune the shift coefficients only; every other weight stays bit-identical.
    trainable = freeze_all_but_shift(model)
    print(f"training {len(trainable)} tensors: {trainable}")
    spec = spec_for_model(model, dict(name="induction", d_vocab=50, seq_len=32), TrainConfig(
        steps=args.steps, batch_size=16, lr=0.1, warmup_steps=0, eval_every=max(1, args.steps // 3),
        eval_batches=2, progress=False, device="cpu"))
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="retrofit-")
    result = train(spec, run_dir, model=model, overwrite=True)
    for record in result.evals:
        print(f"step {record['step']:4d}  eval loss {record['eval/loss']:.4f}")

    # 4. Which heads took the shift up: distance of each head's coefficients from identity.
    coeffs = model.shift_coefficients()
    rows = []
    for which in coeffs.shifted:
        c = coeffs[which]  # [layer, kv_head, lag]
        identity = torch.zeros_like(c)
        identity[..., 0] = 1
        moved = (c - identity).abs().sum(-1)  # [layer, kv_head]
        for layer in range(c.shape[0]):
            for head in range(c.shape[1]):
                rows.append((moved[layer, head].item(), which, layer, head, c[layer, head].tolist()))
    print("heads by how far their shift moved from identity (lag 0 = current token, lag 1 = previous):")
    for dist, which, layer, head, values in sorted(rows, reverse=True):
        print(f"  L{layer}H{head} {which}: |c - identity| = {dist:.3f}  coefficients "
              f"{[round(v, 3) for v in values]}")
    print(f"run folder (metrics.jsonl, final/ checkpoint): {run_dir}")


if __name__ == "__main__":
    main()
