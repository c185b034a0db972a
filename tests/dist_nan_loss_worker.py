"""Run by test_distributed_failures under paddle.distributed.launch: tools/train.py as a user runs it,
except that process 1's loss turns NaN at its second iteration (a run diverging on one process only)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import train  # noqa: E402  tools/train.py
from cli import run_cli  # noqa: E402

import emanet.engine.trainer as trainer  # noqa: E402


def diverge_at_second_iteration(weighted_loss):
    calls = []

    def poisoned(*args):
        loss, parts = weighted_loss(*args)
        calls.append(None)
        return (loss * float('nan') if len(calls) == 2 else loss), parts
    return poisoned


if __name__ == '__main__':
    if os.environ.get('PADDLE_TRAINER_ID') == '1':
        trainer.weighted_loss = diverge_at_second_iteration(trainer.weighted_loss)
    run_cli(train.main, train.parse_args())
