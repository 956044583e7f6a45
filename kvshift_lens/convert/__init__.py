"""Retrofitting pretrained models: Hugging Face GPT-2, Llama-family and GPT-NeoX (Pythia) weights into a
:class:`~kvshift_lens.HookedKVShiftTransformer` at identity (:func:`from_hf`, optionally through a
TransformerLens ``TransformerBridge``), and shift-only fine-tuning (:func:`freeze_all_but_shift`)."""

from kvshift_lens.convert.finetune import (
    freeze_all_but_shift,
    is_shift_parameter,
    spec_for_model,
    unfreeze_all,
)
from kvshift_lens.convert.hf import (
    ModelNotAvailableError,
    from_hf,
    from_transformer_bridge,
    load_hf_model,
    supported_model_types,
)

__all__ = [
    "ModelNotAvailableError",
    "freeze_all_but_shift",
    "from_hf",
    "from_transformer_bridge",
    "is_shift_parameter",
    "load_hf_model",
    "spec_for_model",
    "supported_model_types",
    "unfreeze_all",
]
