"""`python -m bench` from the repository root runs the fastbn benchmark (fastbn/benchmark.py)."""
import importlib.util
import os
import sys

try:
    from fastbn.benchmark import main
except ImportError:
    # fastbn/__init__.py loads the compiled extension; when that is not built, load the
    # benchmark file on its own so that `--stand-in` (and its build hint) still work.
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastbn", "benchmark.py")
    spec = importlib.util.spec_from_file_location("fastbn_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    main = module.main

sys.exit(main())
