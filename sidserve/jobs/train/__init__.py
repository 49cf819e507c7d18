"""Distributed fitting on Ray Train (``sidserve train``, ``jobs/train.py``): ``driver`` (the job),
``worker`` (each Ray Train worker), ``checkpoint`` (per-epoch state), ``baselines`` (RQ-Kmeans,
OPQ, RQ-VAE on a streamed sample).

    pre-pass (Ray Data)   validate the whole input, N_min/N_max, counts, skipped rows
    k-means sample        one sample on the driver, the same object for every worker
    TorchTrainer          N workers, each streams its shard of the cleaned dataset
                          (get_dataset_shard), DDP; the step is ``training.train_step``,
                          the same as the in-process fit
    checkpoints           every epoch via ray.train.report (rank 0 writes); a restarted
                          worker group or a rerun with --resume continues from the last one
    collision regulation  (when on) every refresh epoch: SIDs of all shards gathered by
                          item_id, the same overlapping pairs planned on every rank, each
                          rank repels a disjoint share (``regulation_refresh``)
    artifact              SemanticIdTokenizer.save_pretrained + metrics.json

Per-epoch metrics (every loss term, utilisation and entropy per SID position and the
collision rate of the codes assigned during the epoch, items/s) go to the job log, to
``ray.train.report`` and to ``metrics.json``; the final metrics come from an evaluation
pass over every worker's shard with the trained model.
"""

from sidserve.jobs.train.driver import (
    TrainJobConfig,
    fit_distributed,
    load_config_options,
    load_tokenizer_config,
    run_cli,
)

__all__ = ["TrainJobConfig", "fit_distributed", "load_config_options", "load_tokenizer_config", "run_cli"]
