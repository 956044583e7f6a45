"""Retrofit a pretrained model with KV shifting: convert it at identity, check it still computes the same
logits, fine-tune only the shift coefficients, and see which heads take the shift up (ranked by
the mix each head learnt, its previous-token share, never by raw coefficient values).

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
    #    shift_param="gain_mix" stores each head's mix over lags on the simplex and its gain
    #    separately (gain 1, mix [1, 0] at identity: still exact), so the fine-tune can change what
    #    a head mixes without the mix turning into a scale.
    model = from_hf(hf, shift=("k", "v"), shift_param="gain_mix")
    tokens = torch.randint(0, 50, (4, 32))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    print(f"max |logits - HF logits| at identity: {diff:.2e}")
    assert diff < 1e-4
    before = max(c.abs().max().item() for c in model.shift_coefficients().values.values())

    # 3. Fine-tune the shift parameters only (mixes and gains); every other weight stays
    #    bit-identical. The coefficient learning rate is lr * shift_lr_scale = 0.01: a step moves a
    #    mix by about 0.01, so 60 steps can move a head's mix anywhere on [0, 1] without the
    #    coefficients growing into gains (free coefficients at lr 0.1 x 30 reached |c| ~ 35).
    trainable = freeze_all_but_shift(model)
    print(f"training {len(trainable)} tensors: {trainable}")
    spec = spec_for_model(model, dict(name="induction", d_vocab=50, seq_len=32), TrainConfig(
        steps=args.steps, batch_size=16, lr=0.01, shift_lr_scale=1.0, warmup_steps=0,
        eval_every=max(1, args.steps // 3), eval_batches=2, progress=False, device="cpu"))
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="retrofit-")
    result = train(spec, run_dir, model=model, overwrite=True)
    for record in result.evals:
        print(f"step {record['step']:4d}  eval loss {record['eval/loss']:.4f}")

    # 4. Which heads took the shift up: rank by the measured mix (the share of each head's
    #    coefficients on the previous position, scale-free), and say each head's gain beside it;
    #    raw coefficient values mix the two and are no ranking.
    coeffs = model.shift_coefficients()
    after = max(c.abs().max().item() for c in coeffs.values.values())
    print(f"max |c| before fine-tuning {before:.3f}, after {after:.3f}")
    rows = []
    for which in coeffs.shifted:
        share, gain = coeffs.previous_share(which), coeffs.gain(which)  # [layer, kv_head]
        c = coeffs[which]  # [layer, kv_head, lag]
        for layer in range(c.shape[0]):
            for head in range(c.shape[1]):
                rows.append((share[layer, head].item(), which, layer, head,
                             gain[layer, head].item(), c[layer, head].tolist()))
    print("heads by previous-token share of their mix (0 = vanilla, 1 = reads only the previous "
          "token), with their gain (sum_l |c_l|; 1 at identity):")
    for share, which, layer, head, gain, values in sorted(rows, reverse=True):
        print(f"  L{layer}H{head} {which}: previous share {share:.3f}  gain {gain:.3f}  "
              f"coefficients {[round(v, 3) for v in values]}")
    print(f"run folder (metrics.jsonl, final/ checkpoint): {run_dir}")


if __name__ == "__main__":
    main()
