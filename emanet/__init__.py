"""EMANet (Li et al., ICCV 2019) for PaddlePaddle 3.x, as a PaddleSeg plugin.

``import emanet`` registers its model, losses and datasets in PaddleSeg's component
managers, so ``type: EMANet`` in a PaddleSeg YAML builds this package's model.
"""
import warnings

# Importing paddle warns when ccache is missing, which matters only for compiling C++ extensions.
warnings.filterwarnings('ignore', message='No ccache found', module=r'paddle\.utils\.cpp_extension')

from emanet.runtime import use_fast_mkl_on_amd  # noqa: E402

use_fast_mkl_on_amd()  # before any matrix product of this process

try:
    import cv2  # noqa: F401,E402
    import paddleseg  # noqa: F401,E402
except ModuleNotFoundError as error:  # installing the package asks for neither (see setup.py)
    if error.name not in ('cv2', 'paddleseg'):
        raise
    raise ModuleNotFoundError(
        f"emanet needs {'OpenCV (any one of its wheels)' if error.name == 'cv2' else 'paddleseg 2.8.0'}, "
        "which installing it leaves to you: pip install -r requirements.txt && "
        "pip install --no-deps -r requirements-paddleseg.txt", name=error.name) from None

from emanet.models import EMAU, EMAHead, EMANet  # noqa: E402
from emanet.registry import register_all  # noqa: E402
from emanet.zoo import create_model, list_models  # noqa: E402

__version__ = '0.1.0'
__all__ = ['EMAU', 'EMAHead', 'EMANet', 'create_model', 'list_models']

register_all()
