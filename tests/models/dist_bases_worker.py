"""Run by test_distributed_bases under paddle.distributed.launch: one EMAU training step per rank."""
import sys

import numpy as np
import paddle
import paddle.distributed as dist

from emanet.models import EMAU
from emanet.models.ema_unit import em_iterations

dist.init_parallel_env()
rank = dist.get_rank()
paddle.seed(0)
unit = EMAU(8, 4, stage_num=2, momentum=0.5)
unit.train()
initial = unit.mu.numpy()
x = paddle.to_tensor(np.random.RandomState(rank).randn(2, 8, 3, 3).astype('float32'))
bases, _ = em_iterations(x.flatten(2), unit.mu.astype('float32'), unit.stage_num)
unit(x)
np.savez(f"{sys.argv[1]}/rank{rank}.npz", initial=initial, mu=unit.mu.numpy(), bases=bases.numpy())
