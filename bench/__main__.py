"""`python -m bench` from the repository root runs the fastbn benchmark (bench/cli.py).

bench/ imports fastbn only where it times fastbn, so `--stand-in` (and the build hint
without it) work on a checkout whose extension is not built."""
import sys

from bench.cli import main

sys.exit(main())
