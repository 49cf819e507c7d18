import contextlib
import logging
import os

import pytest

# Ray Train v2 retries an unschedulable worker group forever: make each wait short so a
# resource problem fails the test instead of hanging it (pytest-timeout is the backstop).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
# The Train controller polls its workers every 2 s by default; a test run's epochs take well
# under a second, so every report, restart and finish waited for the next poll (about 5 s of
# a 30 s fit). Production keeps Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Train v2 starts a PreemptionWatcher actor (one more Python process importing Ray Train) with
# every worker group, to log a node's draining notice; one node that never drains has no use
# for it, and each fit and restart of the suite paid its start.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray keeps at most num_cpus idle worker processes and kills the rest after 1 s idle, so every
# fit, Ray Data job and actor pool of the suite started fresh Python processes (each importing
# Ray and, for Train, torch: seconds of CPU on a machine with none to spare). The session
# cluster keeps up to 8 idle workers for 10 minutes and hands them to the next tasks and
# actors: a tiny 1-worker fit went from 31-35 s to 25-26 s after the first (measured beside the
# evaluation run). Production keeps Ray's defaults.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
# Ray Data's DataSource V2 Parquet reader (the 2.60 default) provisions 32 footer-reader
# actors for every read it executes: about 2 s and a burst of 32 processes per read on
# this 2-CPU machine, whatever the file size, paid again by every epoch of a streaming fit.
# The suite reads with V1 (same tables, about 0.3 s a read); test_demo, the end-to-end run
# of the README's command (Parquet read by train and assign), puts Ray's default back.
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
# Ray starts its task and actor workers at nice 15 (`worker_niceness`), below the other xdist
# worker, which lowers itself to nice 10 (pytest_runtest_setup below) so that the Ray tests,
# the suite's critical path, get the CPU first. With Ray's default the opposite happened: the
# Train workers, encoder actors and Ray Data tasks of the session cluster waited behind the
# other worker's CPU-bound tests (the Ray scope ran in 389 s alone and 627 s beside them).
# The session cluster's workers run at the niceness of the test process; production keeps
# Ray's default.
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the Serve configuration we ship (deploy/serve.yaml, docs/benchmarks.md): direct ingress
# through HAProxy
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
# `pytest -n N` with N workers on N CPUs: each worker's torch (and faiss) would start one
# OpenMP thread per CPU, N x N threads spinning at barriers on N cores, and the Ray worker's
# raylet, GCS and actors starved behind them (its assignment tests ran 3-5x slower beside
# the evaluation tests than alone). One thread per worker, set before torch is imported;
# subprocesses the tests start inherit it (Ray sets its own workers' count).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= (os.cpu_count() or 1):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")

# The evaluation's text-embedding cache (sidserve/eval/text.py): one directory for the whole
# run, made by the controlling process before xdist starts its workers (they inherit it), never
# a developer's ~/.cache, removed at the end (pytest_unconfigure below). It starts with the
# quick evaluation's embeddings of the Beauty slice (tests/data/text-embeddings: the entries
# the text model wrote for its two modalities, 4 MB), so the suite does not spend ~35 s of
# CPU re-embedding the same 2,500 texts each run; if the slice, its subsample or the model
# changes, the keys change and the model runs (slower, same results). The model itself runs in
# test_text_cache.py.
if "SIDSERVE_TEXT_CACHE" not in os.environ and not os.environ.get("PYTEST_XDIST_WORKER"):
    import glob
    import shutil
    import tempfile
    os.environ["SIDSERVE_TEXT_CACHE"] = _TEXT_CACHE = tempfile.mkdtemp(prefix="sidserve-test-text-cache-")
    for _f in glob.glob(os.path.join(os.path.dirname(__file__), "data", "text-embeddings", "*.npy")):
        shutil.copy(_f, _TEXT_CACHE)
else:
    _TEXT_CACHE = None

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(ROOT, "tests", "data", "beauty-slice")  # the vendored Beauty slice
# the quick evaluation's tokenizers: ADC-SID (weighted SIDs), a baseline, an external SID file
# (the other ablations flip one switch of the same model; the baselines have tests of their own)
QUICK_EVAL_TOKENIZERS = ["adc_sid", "rqkmeans", "letter"]


def run_evaluate(*args, timeout=900, process=False):
    """``python jobs/evaluate.py ARGS`` -> CompletedProcess (returncode, stdout, stderr with the
    log lines). In this process by default: the same ``job_main("evaluate")`` the script runs,
    its output captured, argv, cwd, torch's thread count and the global RNGs put back after (a
    fresh Python importing torch and the evaluation costs seconds of the suite's 2 CPUs, a dozen
    times in test_evaluate). ``process=True``: the script itself in a subprocess (the exit code
    through the OS; test_bad_arguments_exit_2_with_a_message keeps one such call)."""
    import subprocess
    import sys

    if process:
        return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "evaluate.py"), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    import io
    import random
    import traceback

    import numpy as np
    import torch

    from sidserve.cli import job_main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    root = logging.getLogger()
    saved = (sys.argv, os.getcwd(), root.level, torch.get_num_threads(), torch.get_rng_state(),
             np.random.get_state(), random.getstate())
    sys.argv = [os.path.join(ROOT, "jobs", "evaluate.py"), *map(str, args)]
    os.chdir(ROOT)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = job_main("evaluate")
            except SystemExit as e:  # argparse's usage errors
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what the script would die of: a traceback and exit code 1
                traceback.print_exc()
                rc = 1
    finally:
        root.removeHandler(handler)
        sys.argv = saved[0]
        os.chdir(saved[1])
        root.setLevel(saved[2])
        torch.set_num_threads(saved[3])
        torch.set_rng_state(saved[4])
        np.random.set_state(saved[5])
        random.setstate(saved[6])
    return subprocess.CompletedProcess(sys.argv, rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """jobs/evaluate.py --quick on the slice, once per session: test_evaluate reads its report,
    test_stability its text embeddings (the slowest part of a quick stability run)."""
    out = str(tmp_path_factory.mktemp("eval") / "quick")
    p = run_evaluate("--data", SLICE, "--output", out, "--quick", "--tokenizers", ",".join(QUICK_EVAL_TOKENIZERS))
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


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
    # no serve.shutdown(): with the HAProxy ingress it takes about 30 s (Ray 2.60), and
    # ray.shutdown() ends Serve's processes (HAProxy included) with the cluster
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()  # Ray's Prometheus endpoint of the session cluster
SERVE_PORT = free_port()  # Serve's HTTP port: one Serve instance serves every test module

SERVE_MODULES = ("test_invariance.py", "test_observability.py", "test_serve.py")


# pytest-xdist (`make test` runs 2 workers): the tests that use the session's Ray cluster or
# start Ray Serve (HAProxy's ports and /tmp paths are fixed: two Serve instances on one machine
# collide) run one after another on one worker, in the order below; the quick evaluation's
# readers share its fixture on one worker; every other test goes wherever a worker is free.
# A test that starts its own cluster without Serve (`ray start` with its own ports) needs
# neither. Grouped by module name here, because pytest 9 ignores the node-id suffix that
# xdist's own `--dist loadgroup` relies on.
RAY_MODULES = {"test_assign_job.py", "test_catalog_prepass.py", "test_cli.py", "test_demo.py",
               "test_refresh_job.py", "test_train_sample.py", "test_train_job.py", *SERVE_MODULES}
QUICK_RUN_MODULES = {"test_evaluate.py", "test_stability.py", "test_select.py"}


def xdist_scope(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    if module in RAY_MODULES:
        return "ray"
    if module in QUICK_RUN_MODULES:
        return "quick_run"
    return nodeid


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupedScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return GroupedScheduling(config, log)


def pytest_collection_modifyitems(items):
    """The Serve modules run last, on one Serve instance that is never torn down: deleting
    an app takes about 30 s with the HAProxy ingress, and Train tests need the CPUs a
    replica holds. test_serve.py goes last of all: test_observability may still need a
    Ray Data refresh (its ``refreshed`` fixture), which starves next to a replica. A test
    that uses the session cluster outside RAY_MODULES is an error (it would run beside it)."""
    stray = [i.nodeid for i in items if {"ray_session", "refreshed"} & set(getattr(i, "fixturenames", ()))
             and xdist_scope(i.nodeid) != "ray"]
    if stray:
        raise pytest.UsageError(f"add their modules to conftest.RAY_MODULES: {stray}")
    # the Ray tests first: the "ray" scope is then the first unit of work a worker takes, so that
    # worker runs at normal priority (pytest_runtest_setup below lowers the other one's)
    # and the demo last of them: it shuts the session cluster down for its own, and nothing
    # after it has to start the session cluster again
    # Outside the Ray scope every test is its own unit, handed to whichever worker is free in
    # this order: the slow ones first (longest first is what keeps the two workers' ends close;
    # a 70 s test taken last left the other worker idle for it)
    items.sort(key=lambda item: (xdist_scope(item.nodeid) != "ray", item.path.name == "test_demo.py",
                                 item.path.name in SERVE_MODULES, item.path.name == "test_serve.py",
                                 xdist_scope(item.nodeid) != "ray" and item.get_closest_marker("slow") is None))


_NICED = False


def pytest_runtest_setup(item):
    """Under xdist, a worker's first test outside the Ray scope moves that worker (and the
    subprocesses it starts, e.g. the job-submit test's own cluster) to SCHED_IDLE: it runs on
    whatever CPU the Ray scope leaves. The Ray worker is the suite's critical path, its tests
    mostly waiting on Ray's processes (alone: 378 s wall, 537 s of CPU, 209 s of the 2 CPUs
    idle); the other worker's tests are CPU-bound (alone: 485 s wall, 516 s of CPU) and can use
    those idle seconds. `nice 10` was not enough: a nice-10 task still takes a slice before a
    waking Ray process gets the CPU back. Lowering needs no privilege; nothing raises it back."""
    global _NICED
    if not _NICED and os.environ.get("PYTEST_XDIST_WORKER") and xdist_scope(item.nodeid) != "ray":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):  # not Linux
            os.nice(10)
        _NICED = True


def ensure_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024**2,
                 log_to_driver=True, configure_logging=False, _metrics_export_port=METRICS_PORT)
    return ray


@contextlib.contextmanager
def daemon(cmd: list[str], ready_url: str, name: str, timeout: float = 30.0):
    """Run a server process (Prometheus, Pushgateway) until the block ends; fail the test
    with the process' output if it does not answer ``ready_url`` in time."""
    import shutil
    import subprocess
    import time
    import urllib.request

    if shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} is not installed (.ci/run installs the Debian package)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(ready_url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"{name} did not start: {proc.stdout.read()[-3000:]}")
            time.sleep(0.1)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def pushgateway():
    """A real Pushgateway (Debian prometheus-pushgateway): (host:port, base url)."""
    import shutil

    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway") or "prometheus-pushgateway"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with daemon([binary, f"--web.listen-address=127.0.0.1:{port}"], f"{url}/-/ready", "the Pushgateway"):
        yield f"127.0.0.1:{port}", url


# every Serve test deploys with the same runtime environment (the API key on): a redeploy then
# changes only user_config, which Serve applies to the running replica (reconfigure, about a
# second) instead of replacing it (about 30 s with the HAProxy ingress)
API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def serve_config(user_config: dict, env_vars: dict | None = None, port: int = SERVE_PORT) -> dict:
    """deploy/serve.yaml, as shipped, with this test's port, one replica, the suite's API key
    (plus ``env_vars``) and user_config."""
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    dep = config["applications"][0]["deployments"][0]
    dep["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
    dep["ray_actor_options"]["runtime_env"] = {"env_vars": {"SIDSERVE_API_KEY": API_KEY, **(env_vars or {})}}
    dep["user_config"].update(user_config)
    return config


def deploy_serve(config: dict) -> None:
    """What `serve deploy` does with a config file, on the session's cluster; waits until RUNNING."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options=config["http_options"])
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


def wait_ready(client, timeout: float = 60.0) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        time.sleep(0.2)
    pytest.fail(f"service not ready: {r.status_code} {r.text}")


@pytest.fixture(scope="session")
def refreshed(ray_session, fitted, small_catalog, pushgateway, tmp_path_factory):
    """One real nightly refresh (Ray Data, 600 items) that pushed its metrics to the
    session's Pushgateway; shared by the refresh and the observability tests (each Ray
    Data run costs tens of seconds of fixed overhead on 2 CPUs)."""
    import pyarrow.parquet as pq

    from sidserve.jobs.refresh import RefreshJobConfig, run_refresh

    ray_session()
    base = tmp_path_factory.mktemp("refreshed")
    fitted.save_pretrained(str(base / "model"))
    os.makedirs(base / "items")
    pq.write_table(small_catalog.slice(0, 600), base / "items" / "part-0.parquet")
    summary = run_refresh(RefreshJobConfig(items=str(base / "items"), model=str(base / "model"),
                                           output=str(base / "snap"), pushgateway=pushgateway[0], num_workers=1))
    return dict(base=base, model=str(base / "model"), items=str(base / "items"), snap=str(base / "snap"),
                summary=summary)



# ---- the suite's budget: seconds per xdist worker (docs/testing.md) --------------------------
_WORKER_SECONDS: dict[str, float] = {}
_RAY_WORKER: set[str] = set()


def pytest_runtest_logreport(report):
    """On the controller: add each phase's duration to its worker's total (the suite's wall
    time is the busier worker's; the 10-minute budget is read from this line)."""
    node = getattr(report, "node", None)
    worker = getattr(getattr(node, "gateway", None), "id", None)
    if worker is not None:
        _WORKER_SECONDS[worker] = _WORKER_SECONDS.get(worker, 0.0) + report.duration
        if xdist_scope(report.nodeid) == "ray":
            _RAY_WORKER.add(worker)


def pytest_terminal_summary(terminalreporter):
    if _WORKER_SECONDS:
        terminalreporter.write_line("test seconds per xdist worker: " + ", ".join(
            f"{w}{' (the Ray scope)' if w in _RAY_WORKER else ''} {s:.0f} s"
            for w, s in sorted(_WORKER_SECONDS.items())))


def pytest_unconfigure(config):
    if _TEXT_CACHE is not None:
        import shutil
        shutil.rmtree(_TEXT_CACHE, ignore_errors=True)
