import logging
import os

import pytest

# Ray Train v2 retries an unschedulable worker group forever: make each wait short so a
# resource problem fails the test instead of hanging it (pytest-timeout is the backstop).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the Serve configuration we ship (deploy/serve.yaml, docs/benchmarks.md): direct ingress
# through HAProxy
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")

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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster (2 CPUs) for the whole test session, started on first use.

    A test that needs its own cluster (``ray start --head``) calls ``ray.shutdown()``;
    the next user of this fixture gets a fresh local cluster via ``ensure_ray``.
    """
    import ray

    yield ensure_ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()  # Ray's Prometheus endpoint of the session cluster


def ensure_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024**2,
                 log_to_driver=True, configure_logging=False, _metrics_export_port=METRICS_PORT)
    return ray
