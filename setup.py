import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r"__version__ = '([^']+)'", (here / 'emanet' / '__init__.py').read_text()).group(1)
# paddlepaddle is left out so that an installed paddlepaddle-gpu is not replaced by the CPU build.
requirements = [line.split('#')[0].strip() for line in (here / 'requirements.txt').read_text().splitlines()]
requirements = [r for r in requirements if r and not r.startswith('paddlepaddle')]

setup(
    name='emanet-paddle',
    version=version,
    description='EMANet (Expectation-Maximization Attention Networks) for PaddlePaddle 3.x, a PaddleSeg plugin',
    long_description=(here / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['emanet', 'emanet.*']),
    python_requires='>=3.8',
    install_requires=requirements,
    # pip install emanet-paddle[deploy]: ONNX, ONNX Runtime, OpenVINO and int8 quantization.
    extras_require={'deploy': [line.split('#')[0].strip() for line in
                               (here / 'requirements-deploy.txt').read_text().splitlines()
                               if line.split('#')[0].strip()]},
    license='Apache-2.0',
)
