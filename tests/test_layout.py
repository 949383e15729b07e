"""The package's shape: `import fastbn` loads the library only, not the MNIST app, the
benchmark or their dependencies."""
import json
import subprocess
import sys

# What the apps use and the library does not (torch itself may load some of them: only what
# `import fastbn` adds to `import torch` counts).
APP_MODULES = ("fastbn.mnist", "fastbn.benchmark", "bench", "torchvision", "matplotlib", "tqdm", "numcodecs",
               "pureml", "zarr")


def test_import_fastbn_loads_no_app_and_no_app_dependency():
    script = ("import json, sys, torch; before = set(sys.modules); import fastbn; "
              "print(json.dumps(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    added = json.loads(result.stdout.strip().splitlines()[-1])
    assert "fastbn.ops" in added  # (the library itself did load)
    loaded = [name for name in added if any(name == app or name.startswith(app + ".") for app in APP_MODULES)]
    assert not loaded, f"import fastbn loaded {loaded}"
