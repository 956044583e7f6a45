"""Circuit probes for models that meet TransformerLens 4's protocol, with shift-aware extensions.

This package grows with the probes issue; for now it holds the effective source pattern of a
shifted head, which every other shift-aware probe builds on.
"""

from probes.effective import effective_pattern

__all__ = ["effective_pattern"]
