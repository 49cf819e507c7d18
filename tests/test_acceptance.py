"""Issue acceptance: paper's public settings on a >= 20k synthetic catalog."""

import math

import pytest

from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog


@pytest.mark.slow
def test_public_settings_fit_quality():
    items = make_synthetic_catalog(20000, seed=0)
    config = TokenizerConfig(codebook_size=100, num_shared_experts=1, num_content_experts=1,
                             num_behavior_experts=3, epochs=20)
    tok = SemanticIdTokenizer(config).fit(items)
    metrics = tok.stats_["fit_metrics"]
    assert len(metrics["utilisation_per_position"]) == 6
    assert min(metrics["utilisation_per_position"]) >= 0.95
    assert metrics["recon"] < tok.stats_["init_metrics"]["recon"]
    assert metrics["entropy_mean"] >= 0.9 * math.log(100)
    assert min(metrics["entropy_per_position"]) >= 0.9 * math.log(100)
