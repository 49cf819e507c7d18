import logging

import pytest

from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog

logging.getLogger("faiss.loader").setLevel(logging.WARNING)

SMALL = dict(
    modality_dims={"text": 24, "image": 16},
    behavior_dim=12,
    codebook_size=16,
    hidden_dim=32,
    latent_dim=16,
    expert_hidden_dim=32,
    epochs=2,
    batch_size=256,
    restart_every=5,
)


@pytest.fixture(scope="session")
def small_config() -> TokenizerConfig:
    return TokenizerConfig(**SMALL)


@pytest.fixture(scope="session")
def small_catalog():
    return make_synthetic_catalog(
        1500, modality_dims=SMALL["modality_dims"], behavior_dim=SMALL["behavior_dim"],
        n_clusters=32, cold_share=0.2, seed=1,
    )


@pytest.fixture(scope="session")
def fitted(small_config, small_catalog) -> SemanticIdTokenizer:
    return SemanticIdTokenizer(small_config).fit(small_catalog)
