"""Run by test_trainer under paddle.distributed.launch: train, then dump this rank's final state."""
import sys

import numpy as np

import emanet.engine.checkpointer as checkpointer
import emanet.engine.trainer as trainer
from emanet.config import load_config

config, save_dir, dump_dir = sys.argv[1:4]
rank = trainer.dist.get_rank()
writers = []
original_save = checkpointer.save_checkpoint
checkpointer.save_checkpoint = lambda *a, **k: (writers.append(a[0]), original_save(*a, **k))
model = trainer.train(load_config(config), save_dir=save_dir, save_interval=4, seed=5)
state = {k: v.numpy() for k, v in model.state_dict().items()}
np.savez(f'{dump_dir}/rank{rank}.npz', writers=np.array(writers, dtype=object), **state)
