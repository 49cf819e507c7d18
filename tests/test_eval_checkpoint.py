"""A downstream model's training interrupted after any epoch and resumed from its
``EpochCheckpoint`` ends with exactly the weights and history of an uninterrupted run."""

import numpy as np
import pytest
import torch

from sidserve.eval import checkpoint as ckpt_mod
from sidserve.eval.data import Dataset
from sidserve.eval.early_stopping import EarlyStopping
from sidserve.eval.ranking import RankingConfig, sample_negatives, train_ranker
from sidserve.eval.retrieval import RetrievalConfig, train_retrieval
from sidserve.eval.sasrec import SASRecConfig, SIDItems, train_sasrec
from sidserve.eval.sid_table import SIDTable

N = 30


class Interrupted(Exception):
    pass


def _data():
    rng = np.random.default_rng(0)
    seqs = [(s - 1 + np.arange(k)) % N + 1 for s, k in zip(rng.integers(1, N + 1, 150), rng.integers(5, 9, 150))]
    return Dataset(seqs, [{} for _ in range(N)])


def _table():
    return SIDTable.build(np.stack([np.arange(N) % 6, np.arange(N) // 6], 1), np.full((N, 2), 0.5, np.float32))


def _train(kind, data, path, **over):
    """One of the three trainers, small; dropout on so the torch generator matters, patience
    short so early stopping (and its saved best weights) decide the result."""
    if kind == "sasrec":
        c = SASRecConfig(max_epochs=6, patience=2, dropout=0.3, hidden_dim=16, ff_dim=32, batch_size=32, lr=5e-3,
                         max_len=10, **over)
        return train_sasrec(data.train_sequences(), N, c, valid=data.targets("valid"), checkpoint=path)
    if kind == "sid_sasrec":
        c = SASRecConfig(max_epochs=6, patience=2, dropout=0.3, hidden_dim=16, ff_dim=32, batch_size=32, lr=5e-3,
                         max_len=10, **over)
        torch.manual_seed(0)  # the caller seeds the item table's init (as the pipeline does)
        return train_sasrec(data.train_sequences(), N, c, valid=data.targets("valid"), items=SIDItems(_table(), 16),
                            checkpoint=path)
    if kind == "retrieval":
        c = RetrievalConfig(d_model=16, ff_dim=16, num_heads=2, max_epochs=5, patience=2, min_epochs=0,
                            batch_size=64, lr=5e-3, warmup_steps=10, dropout=0.3, valid_users=50, beam_size=10,
                            **over)
        return train_retrieval(_table(), data.train_sequences(), data.targets("valid"), c, checkpoint=path)
    vh, vt = data.targets("valid")
    neg = sample_negatives(np.random.default_rng(1), [s[:-1] for s in data.sequences], N, 10)
    c = RankingConfig(max_epochs=5, patience=2, d_model=16, mlp_dim=16, batch_size=64, lr=1e-2, **over)
    return train_ranker(_table(), data.train_sequences(), c, valid=(vh, vt, neg), checkpoint=path)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _without_time(history):
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]


@pytest.mark.parametrize("kind", ["sasrec", "sid_sasrec", "retrieval", "ranking"])
def test_a_run_interrupted_after_any_epoch_resumes_to_the_uninterrupted_result(kind, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    data = _data()
    ref, ref_hist = _train(kind, data, None)
    assert ref.early_stopping["resumed_from_epoch"] is None
    save = ckpt_mod.EpochCheckpoint.save
    for stop_after in range(len(ref_hist)):  # the last one: killed after training stopped, before the result
        path = str(tmp_path / f"{kind}-{stop_after}.ckpt.pt")

        def save_then_die(self, epoch, *a, _at=stop_after, **kw):
            save(self, epoch, *a, **kw)
            if epoch == _at:
                raise Interrupted

        monkeypatch.setattr(ckpt_mod.EpochCheckpoint, "save", save_then_die)
        with pytest.raises(Interrupted):
            _train(kind, data, path)
        monkeypatch.setattr(ckpt_mod.EpochCheckpoint, "save", save)
        model, hist = _train(kind, data, path)
        assert model.early_stopping["resumed_from_epoch"] == stop_after + 1
        assert _without_time(hist) == _without_time(ref_hist)
        assert model.early_stopping["best_epoch"] == ref.early_stopping["best_epoch"]
        _same(model, ref)


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path, monkeypatch, caplog):
    data = _data()
    path = str(tmp_path / "s.ckpt.pt")
    _train("sasrec", data, path)  # leaves the checkpoint of its last epoch (the pipeline removes it)
    model, hist = _train("sasrec", data, path, seed=1)
    assert model.early_stopping["resumed_from_epoch"] is None and hist[0]["epoch"] == 0
    assert "written under another configuration" in caplog.text


def test_early_stopping_state_round_trips():
    a = EarlyStopping(3, mode="min")
    m = torch.nn.Linear(2, 1)
    for epoch, v in enumerate([3.0, 2.0, 2.5]):
        a.update(epoch, v, m)
    b = EarlyStopping(3, mode="min")
    b.load_state_dict(a.state_dict())
    assert b.summary() == a.summary() and b.bad_evaluations == 1
    # the next evaluation is judged the same way by both
    assert a.update(3, 2.6, m) == b.update(3, 2.6, m) is False
    assert a.update(4, 2.7, m) == b.update(4, 2.7, m) is True
