"""locus: where behaviour lives inside (vision-)language models.

A thin library shared by the reproduction notebooks. The shared core sits at the top level:
the toy world (``data``, ``models``, ``training``, ``zoo``), model access (``arch``, ``hooks``,
``prompts``, ``evaluation``), ``linalg``, and the plumbing (``params``, ``checkpoints``, ``io``,
``paths``, ``plotting``, ``results``). One subpackage per paper builds on it:

- ``locus.lost_in_attention``: residual-update geometry (RID, MixIG) and attention replacement;
- ``locus.projlens``: projector backdoors, their low-rank structure and the embedding shift;
- ``locus.safeseek``: differentiable unit masks, circuits, backdoors and circuit tuning.

Imports point one way: the papers import the core, never each other; the core imports no paper.
"""

__version__ = "0.1.0"

import warnings

# transformers imports tqdm.auto, which warns in any Jupyter kernel without ipywidgets; the
# library's own bars are plain text, so the warning is only noise in every notebook.
warnings.filterwarnings("ignore", message="IProgress not found")
