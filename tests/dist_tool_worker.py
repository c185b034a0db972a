"""Run by test_distributed under paddle.distributed.launch: tools/train.py as it runs, then this rank's weights
and the files it renamed into place under --save_dir (every save ends in such a rename)."""
import os
import sys

import numpy as np
import paddle.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import train  # noqa: E402  tools/train.py

from emanet.logger import setup_logging  # noqa: E402

dump_dir, argv = sys.argv[1], sys.argv[2:]
args = train.parse_args(argv)
save_dir = os.path.abspath(args.save_dir)
renamed = []
real_replace = os.replace


def recording_replace(source, target):
    if os.path.abspath(target).startswith(save_dir + os.sep):
        renamed.append(os.path.relpath(os.path.abspath(target), save_dir))
    real_replace(source, target)


os.replace = recording_replace
setup_logging()
model = train.main(args)
np.savez(os.path.join(dump_dir, f'rank{dist.get_rank()}.npz'), renamed=np.array(renamed, dtype=object),
         **{key: value.numpy() for key, value in model.state_dict().items()})
