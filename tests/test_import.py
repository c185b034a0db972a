"""`import emanet` changes nothing in the process but PaddleSeg's `EMANet` entry (timm, mmseg and detectron2 likewise).

Each check runs in a fresh interpreter, as a user's script would import the package.
"""
import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, logging, os, sys, warnings
import paddleseg
from paddleseg.cvlibs import manager
REGISTRIES = ('MODELS', 'BACKBONES', 'DATASETS', 'TRANSFORMS', 'LOSSES')

def registries():
    return {name: dict(getattr(manager, name).components_dict) for name in REGISTRIES}

environ, before, root_handlers = dict(os.environ), registries(), list(logging.getLogger().handlers)
filters = list(warnings.filters)
import emanet
after = registries()
package_logger = logging.getLogger('emanet')
print(json.dumps({
    'environ_changes': sorted(k for k in set(environ) | set(os.environ) if environ.get(k) != os.environ.get(k)),
    'registry_changes': sorted(f'{registry}.{key}' for registry in REGISTRIES
                               for key in set(before[registry]) | set(after[registry])
                               if before[registry].get(key) is not after[registry].get(key)),
    'emanet_is_ours': manager.MODELS['EMANet'] is emanet.EMANet,
    'handlers': [type(h).__name__ for h in package_logger.handlers],
    'propagate': package_logger.propagate,
    'level': package_logger.level,
    'root_handlers_unchanged': logging.getLogger().handlers == root_handlers,
    'scene_painter_imported': 'emanet.data.scene_painter' in sys.modules,
    'paddlex_modules': sorted(m for m in sys.modules
                              if m == 'paddlex' or m.startswith(('paddlex.', 'emanet.integrations'))),
    'ray_modules': sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')),
    'warning_filters_unchanged': warnings.filters == filters,
}))
"""


@pytest.fixture(scope='module')
def imported():
    return import_in_a_fresh_process()


def import_in_a_fresh_process():
    # Without the variable the tools set on AMD CPUs (this test process may have imported tools/cli.py).
    env = {key: value for key, value in os.environ.items() if key != 'MKL_DEBUG_CPU_TYPE'}
    result = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.splitlines()[-1]), result.stdout


def test_import_leaves_the_environment_and_the_warning_filters_alone(imported):
    found, _ = imported
    assert found['environ_changes'] == []
    assert found['warning_filters_unchanged']


def test_import_changes_only_the_emanet_entry_of_paddlesegs_registries(imported):
    found, _ = imported
    assert found['registry_changes'] == ['MODELS.EMANet']
    assert found['emanet_is_ours']


def test_the_packages_log_records_reach_the_users_logging_config(imported):
    found, stdout = imported
    assert set(found['handlers']) <= {'NullHandler'}
    assert found['propagate'] is True
    assert found['level'] == 0  # NOTSET: the user's configuration decides
    assert found['root_handlers_unchanged']
    assert stdout.splitlines()[:-1] == []  # import itself logs nothing


def test_import_does_not_load_the_quick_start_scene_painter(imported):
    found, _ = imported
    assert found['scene_painter_imported'] is False


def test_import_loads_neither_paddlex_nor_the_paddlex_integration(imported):
    found, _ = imported
    assert found['paddlex_modules'] == []


def test_import_loads_neither_ray_nor_the_ray_integration(imported):
    found, _ = imported
    assert found['ray_modules'] == []
    assert 'emanet.integrations.ray' not in found['paddlex_modules']  # every emanet.integrations module is listed there
