"""EMANet (Li et al., ICCV 2019) for PaddlePaddle 3.x, as a PaddleSeg plugin.

``import emanet`` puts its model into PaddleSeg's model registry in place of PaddleSeg's, so
``type: EMANet`` in a PaddleSeg YAML builds this package's model; it changes nothing else in the
process. Its losses and datasets for Paddle 3 are what this package's builder uses (``emanet.registry``).
What its tools set for speed and logging, a program asks for with one call each:
``emanet.device.use_fast_mkl_on_amd()``, ``emanet.device.tune_cpu_allocator()``,
``emanet.logger.setup_logging()``.
"""
try:
    import cv2  # noqa: F401
    import paddleseg  # noqa: F401
except ModuleNotFoundError as error:  # installing the package asks for neither (see setup.py)
    if error.name not in ('cv2', 'paddleseg'):
        raise
    raise ModuleNotFoundError(
        f"emanet needs {'OpenCV (any one of its wheels)' if error.name == 'cv2' else 'paddleseg 2.8.0'}, "
        "which installing it leaves to you: pip install -r requirements.txt && "
        "pip install --no-deps -r requirements-paddleseg.txt", name=error.name) from None

from emanet.models import EMAU, EMAHead, EMANet  # noqa: E402
from emanet.registry import register_model  # noqa: E402
from emanet.zoo import create_model, list_models  # noqa: E402

__version__ = '0.1.0'
__all__ = ['EMAU', 'EMAHead', 'EMANet', 'create_model', 'list_models']

register_model()
