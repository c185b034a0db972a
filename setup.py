import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r"__version__ = '([^']+)'", (here / 'emanet' / '__init__.py').read_text()).group(1)
# Left out of what installing the package asks for, so that it never replaces what an environment has:
# paddlepaddle (an installed paddlepaddle-gpu would be replaced by the CPU build) and OpenCV (the user's
# opencv-python, -headless or -contrib wheel provides the same cv2; a second one would overwrite it).
# paddleseg 2.8.0 is not named either: its metadata pins opencv-python<=4.6.0, so pip would install that
# beside the user's OpenCV; it is installed with --no-deps (requirements-paddleseg.txt).
NOT_REQUIRED = ('paddlepaddle', 'opencv-python-headless')
requirements = [line.split('#')[0].strip() for line in (here / 'requirements.txt').read_text().splitlines()]
requirements = [r for r in requirements if r and not r.startswith(NOT_REQUIRED)]

setup(
    name='emanet-paddle',
    version=version,
    description='EMANet (Expectation-Maximization Attention Networks) for PaddlePaddle 3.x, a PaddleSeg plugin',
    long_description=(here / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['emanet', 'emanet.*']),
    python_requires='>=3.9',
    install_requires=requirements,
    # pip install emanet-paddle[deploy]: ONNX, ONNX Runtime, OpenVINO and int8 quantization.
    extras_require={'deploy': [line.split('#')[0].strip() for line in
                               (here / 'requirements-deploy.txt').read_text().splitlines()
                               if line.split('#')[0].strip()],
                    # pip install emanet-paddle[paddlex]: EMANet in PaddleX (emanet.integrations.paddlex), the
                    # PaddleX version its tests ran with, with what create_model (cv) and serving need.
                    'paddlex': ['paddlex[cv,serving]==3.7.2'],
                    # pip install emanet-paddle[demo]: the demo page (tools/demo.py), Gradio 6 (Python >= 3.10).
                    'demo': ['gradio>=6,<7; python_version >= "3.10"'],
                    # pip install emanet-paddle[geo]: GeoTIFFs of any size, window by window (emanet.rasters).
                    'geo': [line.split('#')[0].strip() for line in
                            (here / 'requirements-geo.txt').read_text().splitlines() if line.split('#')[0].strip()],
                    # pip install emanet-paddle[ray]: tools/infer.py --ray (emanet.integrations.ray), Ray Data on a
                    # cluster; every node and the driver need the same Ray version.
                    'ray': ['ray[data]>=2.60; python_version >= "3.10"']},
    license='Apache-2.0',
)
