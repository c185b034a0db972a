"""Run by test_distributed under paddle.distributed.launch: tools/train.py as it runs, then this rank's weights."""
import os
import sys

import numpy as np
import paddle.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import train  # noqa: E402  tools/train.py

from emanet.logger import setup_logging  # noqa: E402

dump_dir, argv = sys.argv[1], sys.argv[2:]
setup_logging()
model = train.main(train.parse_args(argv))
np.savez(os.path.join(dump_dir, f'rank{dist.get_rank()}.npz'),
         **{key: value.numpy() for key, value in model.state_dict().items()})
