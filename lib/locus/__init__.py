"""locus: where behaviour lives inside (vision-)language models.

A thin library shared by the reproduction notebooks: toy models and data, hooks, metrics,
attention interventions, masks, and the claims report.
"""

__version__ = "0.1.0"

import warnings

# transformers imports tqdm.auto, which warns in any Jupyter kernel without ipywidgets; the
# library's own bars are plain text, so the warning is only noise in every notebook.
warnings.filterwarnings("ignore", message="IProgress not found")
