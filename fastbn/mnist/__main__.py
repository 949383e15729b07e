"""``python -m fastbn.mnist ...`` (and ``torchrun ... -m fastbn.mnist ...``): the fastbn-mnist command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
