"""locus: where behaviour lives inside (vision-)language models.

A thin library shared by the reproduction notebooks: toy models and data, hooks, metrics,
attention interventions, masks, and the claims report.
"""

__version__ = "0.1.0"
