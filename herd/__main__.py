"""`python -m herd ...` is the `herd` command; torchrun launches distributed runs this way:

    torchrun --nproc_per_node 4 -m herd pretrain --config configs/tiny.toml --parallel.dp_shard=2 --parallel.tp=2
"""

import sys

from herd.cli import main

if __name__ == "__main__":
    sys.exit(main())
