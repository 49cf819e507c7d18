"""`pip install sidserve` from a wheel: the package carries what `sidserve demo` and
`sidserve serve` need, without the source tree."""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_wheel_in_a_fresh_venv_runs_the_cli(tmp_path):
    # the tracked files only, so the build writes nothing into this checkout
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            target.symlink_to(os.readlink(ROOT / name))
        elif (ROOT / name).exists():
            target.write_bytes((ROOT / name).read_bytes())
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist,
                    str(src)], check=True, cwd=tmp_path, timeout=240)
    wheel = next(dist.glob("sidserve-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # the wheel alone, then the dependencies borrowed from this environment (a .pth adds the
    # directory but runs none of its .pth files, so this checkout's editable install is not seen)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, timeout=240)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    probe = subprocess.run(
        [python, "-c", "import sidserve, sidserve.demo; print(sidserve.__file__); print(sidserve.demo.serve_config_text())"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    where, _, text = probe.stdout.partition("\n")
    assert where.startswith(str(site)), where  # the installed wheel, not this checkout
    assert yaml.safe_load(text) == yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())

    for command in ("train", "assign", "refresh", "serve", "evaluate", "demo"):
        out = subprocess.run([env_dir / "bin" / "sidserve", command, "--help"], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=120)
        assert out.returncode == 0 and f"usage: sidserve {command}" in out.stdout, out.stderr
