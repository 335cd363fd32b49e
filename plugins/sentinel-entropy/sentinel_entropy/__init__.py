"""Sentinel plugin: the ``entropy`` head scorer.

Importance of a head = 1 - its mean normalised attention entropy over the calibration tokens
(see :mod:`sentinel_core.attention_entropy` for the exact formula). A head that spreads its
attention evenly (entropy near 1) is taken to be the least important; a head that attends
sharply (entropy near 0) the most. Scores are in [0, 1] in every layer, so they are comparable
across layers without normalisation.
"""

from __future__ import annotations

import sentinel_core
from sentinel_core.attention_entropy import allowed_key_counts, normalized_entropy_sums
from sentinel_core.results import Strategy

from .scorer import NAME, entropy_scores

__all__ = ["NAME", "entropy_scores", "normalized_entropy_sums", "allowed_key_counts"]
__version__ = "0.1.0"


@sentinel_core.hookimpl
def register_strategies():
    return [Strategy("score_heads", NAME, "1 - mean normalised attention entropy (diffuse heads go first)",
                     function=entropy_scores)]
