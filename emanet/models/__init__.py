"""The model: ``ema_unit`` (the EM Attention Unit: E-step, M-step, moving-average bases), ``emanet`` (the
EMANet head and the network on a dilated backbone), ``losses`` (PaddleSeg's losses, working on Paddle 3)."""
from emanet.models.ema_unit import EMAU
from emanet.models.emanet import EMAHead, EMANet

__all__ = ['EMAU', 'EMAHead', 'EMANet']
