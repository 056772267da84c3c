"""Lost in Attention (Xi et al., 2026): attention's residual updates re-mix tokens inside the
existing subspace, the FFN's add new directions (``metrics``: RID, MixIG; ``geometry``: per-layer
streaming over a model); learned visual attention can be replaced by predefined values
(``attention``: replacement inside the attention computation)."""
