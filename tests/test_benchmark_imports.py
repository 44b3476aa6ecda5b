"""Benchmark scripts run as `python benchmarks/<name>.py`, which puts benchmarks/ first on the import path:
there its kernels.py would stand in for Hugging Face's `kernels` package (a transformers dependency that
transformers imports while loading Llama), and loading any model would fail. Each script takes its
folder off the path before anything imports transformers."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the scripts with a main guard (profile_*.py parse their arguments and need a GPU on import; they start
# with the same two lines)
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())

PROBE = """
import importlib.util, runpy, sys
path = sys.argv[1]
sys.path.insert(0, str(__import__('pathlib').Path(path).parent))   # what `python benchmarks/x.py` does
runpy.run_path(path, run_name="not_main")
spec = importlib.util.find_spec("kernels")
print(spec.origin if spec else "none")
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_does_not_shadow_the_kernels_package(script):
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "benchmarks" / script)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip().splitlines()[-1]
    assert Path(origin).resolve() != (ROOT / "benchmarks" / "kernels.py").resolve(), origin
