"""The package people install: the optimizer's core needs torch alone; the harness is the `bench` extra."""

import json
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ["ray", "optuna", "mlflow", "timm", "peft", "pandas", "sklearn", "scipy", "seaborn", "pydantic", "yaml",
           "torchvision", "pyarrow", "matplotlib"]


def test_built_wheel_requires_only_torch_outside_the_extras(tmp_path):
    src = tmp_path / "src"  # a copy, so setuptools' build/ and egg-info stay out of the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("profit_bench", "baselines", "analysis"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("profit_bench-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = [r.name for r in reqs if r.marker is None]
    assert core == ["torch"]
    in_extra = {r.name for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "bench"})}
    assert {"ray", "optuna", "mlflow", "timm", "peft", "torchvision", "scikit-learn", "pandas"} <= in_extra
    assert {"bench", "dev"} <= set(meta.get_all("Provides-Extra"))


def test_importing_the_optimizer_pulls_in_no_harness_package():
    code = ("import json, sys; import profit_bench.optim; from profit_bench.optim import PROFIT; "
            f"print(json.dumps(sorted(m for m in {HARNESS!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
