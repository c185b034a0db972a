from emanet.models.ema_unit import EMAU
from emanet.models.emanet import EMAHead, EMANet

__all__ = ['EMAU', 'EMAHead', 'EMANet']
