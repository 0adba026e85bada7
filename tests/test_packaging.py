"""The package people install: the optimizer's core needs torch alone; the harness is the `bench` extra."""

import ast
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


def _project_imports() -> dict[str, set[str]]:
    """Module → project modules it imports anywhere in its body (function-level imports count: a circle through
    a lazy import is still a circle a reader has to untangle)."""
    files = {f"{f.parent.name}.{f.stem}" if f.stem != "__init__" else f.parent.name: f
             for pkg in ("profit_bench", "baselines", "analysis") for f in (ROOT / pkg).glob("*.py")}
    graph = {}
    for mod, path in files.items():
        pkg = mod.split(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = f"{pkg}.{node.module}" if node.level else node.module
                found |= {base} | {f"{base}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[mod] = {m for m in found if m in files and m != mod and m != pkg}
    return graph


def test_no_import_circles_even_through_function_level_imports():
    graph = _project_imports()
    assert len(graph) > 20 and "profit_bench.plan" in graph["profit_bench.sweep"]  # the walk sees real edges
    done, on_path, circles = set(), [], []

    def visit(mod):
        if mod in on_path:
            circles.append(on_path[on_path.index(mod):] + [mod])
            return
        if mod in done:
            return
        on_path.append(mod)
        for dep in sorted(graph[mod]):
            visit(dep)
        on_path.pop()
        done.add(mod)

    for mod in sorted(graph):
        visit(mod)
    assert circles == []
