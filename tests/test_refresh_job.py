"""The nightly refresh: metrics in a real Pushgateway, warm-started re-fit."""

import json
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from sidserve import load_tokenizer
from sidserve.jobs.refresh import (
    STICKY_DELTA,
    RefreshJobConfig,
    push_failure,
    resolve_sticky,
    run_refresh,
)
from sidserve.snapshot import SnapshotRoot


def scrape(url: str) -> dict:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("job") == "sidserve_refresh":
                key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items()
                                                 if k not in ("job", "instance"))))
                out[key] = sample.value
    return out


@pytest.mark.timeout(600)
def test_refresh_pushes_metrics(refreshed, pushgateway):
    addr, url = pushgateway
    s = refreshed["summary"]  # conftest: one run_refresh(..., pushgateway=addr) on 600 items
    m = scrape(url)
    assert m[("sidserve_refresh_items", ())] == s["items"] == 600
    assert m[("sidserve_refresh_rejects", ())] == s["rejects"] == 0
    assert m[("sidserve_refresh_input_rows", ())] == 600
    assert m[("sidserve_refresh_collision_rate", ())] == pytest.approx(s["collision_rate"])
    assert m[("sidserve_refresh_churn_ratio", ())] == 0.0  # first snapshot: nothing in common
    assert m[("sidserve_refresh_churn_ceiling", ())] == 0.2  # --churn-alert default: the alert's threshold
    assert m[("sidserve_refresh_new_items", ())] == 600
    assert m[("sidserve_refresh_duration_seconds", ())] > 0
    assert abs(m[("sidserve_refresh_last_success_timestamp_seconds", ())] - time.time()) < 600
    assert m[("sidserve_refresh_snapshot_info", (("model_version", s["model_version"]),
                                                  ("version", s["version"])))] == 1
    assert s["prepass"]["num_rows"] == 600
    assert s["sticky"]["delta"] == STICKY_DELTA  # the refresh default for an ADC-SID model

    # a failure adds its timestamp and keeps the last success
    push_failure(addr)
    m2 = scrape(url)
    assert ("sidserve_refresh_last_failure_timestamp_seconds", ()) in m2
    assert m2[("sidserve_refresh_last_success_timestamp_seconds", ())] == \
        m[("sidserve_refresh_last_success_timestamp_seconds", ())]


@pytest.mark.timeout(600)
def test_refit_warm_start_publishes_with_new_model(refreshed, tmp_path):
    base = refreshed["base"]
    s = run_refresh(RefreshJobConfig(items=str(base / "items"), model=str(base / "model"),
                                     output=str(tmp_path / "snap"), refit=True, refit_epochs=1,
                                     refit_codebooks="frozen", refit_output=str(tmp_path / "model-2")))
    old, new = load_tokenizer(str(base / "model")), load_tokenizer(str(tmp_path / "model-2"))
    assert new.version != old.version and s["model_version"] == new.version
    assert SnapshotRoot(str(tmp_path / "snap")).read_items().column("model_version").to_pylist()[0] == new.version
    # warm start: one epoch from the old weights stays close to the old assignment
    a = old.encode(pq.read_table(base / "items")).sid
    b = new.encode(pq.read_table(base / "items")).sid
    assert (a == b).mean() > 0.5
    # --refit-codebooks frozen (Ray Train workers): the codewords are the old model's, bit for bit
    assert new.config.train_codebooks is False
    assert all(torch.equal(p.embed, q.embed) for p, q in zip(old.model_.codebooks, new.model_.codebooks))
    # the warm start drew no k-means sample (issue 50.6: it drew one over the catalog and ignored it)
    assert json.loads((tmp_path / "model-2" / "metrics.json").read_text())["kmeans_sample"] == 0


def test_the_refresh_sticky_default_is_per_tokenizer():
    assert resolve_sticky("auto", "adc-sid") == STICKY_DELTA > 0
    assert resolve_sticky("auto", "rq-kmeans") is None and resolve_sticky("auto", "opq") is None
    assert resolve_sticky(0.05, "opq") == 0.05 and resolve_sticky(None, "adc-sid") is None
    # adc-sid with residual behavioral codes: a code cannot be kept alone, so plain assignment
    assert resolve_sticky("auto", "adc-sid", independent_positions=False) is None
    for bad in ("always", -0.1):
        with pytest.raises(ValueError, match="sticky_delta"):
            resolve_sticky(bad, "adc-sid")


@pytest.mark.parametrize("kw,needle", [(dict(refit_codebooks="frozen"), "needs refit"),
                                       (dict(refit=True, refit_codebooks="fixed"), "'fixed'")])
def test_refit_codebooks_is_checked_before_anything_runs(kw, needle, tmp_path):
    with pytest.raises(ValueError, match=needle):
        run_refresh(RefreshJobConfig(items=str(tmp_path / "i"), model=str(tmp_path / "m"),
                                     output=str(tmp_path / "s"), **kw))


def test_refresh_failure_on_bad_input_is_an_error(refreshed, pushgateway, tmp_path):
    addr, url = pushgateway
    with pytest.raises((OSError, ValueError)):  # Ray: FileNotFoundError for a missing input
        run_refresh(RefreshJobConfig(items=str(tmp_path / "missing"), model=refreshed["model"],
                                     output=str(tmp_path / "snap"), pushgateway=addr))
    assert ("sidserve_refresh_last_failure_timestamp_seconds", ()) in scrape(url)


def test_a_metrics_push_that_fails_after_publishing_does_not_fail_the_job(refreshed, tmp_path, caplog):
    from conftest import free_port

    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    s = run_refresh(RefreshJobConfig(items=refreshed["items"], model=refreshed["model"],
                                     output=str(tmp_path / "snap"), pushgateway=closed, num_workers=1))
    assert s["push_failures"] == 1
    assert SnapshotRoot(str(tmp_path / "snap")).latest() == s["version"]  # published all the same
    assert any("pushing its metrics" in r.getMessage() for r in caplog.records)
