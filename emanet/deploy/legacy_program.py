"""Tracing into Paddle's legacy program format (model.pdmodel), which Paddle 3.3 writes only in a
process started with ``FLAGS_enable_pir_api=0``.

That format is what PaddleSeg's ``deploy/python/infer.py``, Paddle Inference 2.x and Paddle-Lite
read. Paddle 3.3 can still write it, but several functions it generates no longer build legacy
operators: ``paddle.matmul``, ``maximum``, ``minimum``, ``floor`` and ``argmax`` raise "argument must
be Value, but got Variable", and ``F.normalize`` fails on a variable it never sets. Inside
``legacy_operators()`` those functions append the legacy operators themselves (matmul_v2,
elementwise_max/min, floor, arg_max, p_norm); outside a legacy static graph they are Paddle's own.
"""
import contextlib

import paddle
import paddle.nn.functional as F
from paddle.base.framework import convert_np_dtype_to_dtype_
from paddle.base.layer_helper import LayerHelper

PIR_FLAG = 'FLAGS_enable_pir_api'


def writes_legacy_program():
    """Whether this process traces into the legacy program format (started with FLAGS_enable_pir_api=0)."""
    return not paddle.get_flags(PIR_FLAG)[PIR_FLAG]


def _append(op_type, inputs, attrs, dtype):
    helper = LayerHelper(op_type)
    out = helper.create_variable_for_type_inference(dtype=dtype)
    helper.append_op(type=op_type, inputs=inputs, outputs={'Out': out}, attrs=attrs)
    return out


def _in_legacy_graph():
    return not (paddle.in_dynamic_mode() or paddle.framework.in_pir_mode())


def _legacy_versions(paddle_ops):
    """Replacements for Paddle's functions (``paddle_ops``: name -> Paddle's own function)."""

    def matmul(x, y, transpose_x=False, transpose_y=False, name=None):
        if not _in_legacy_graph():
            return paddle_ops['matmul'](x, y, transpose_x=transpose_x, transpose_y=transpose_y)
        return _append('matmul_v2', {'X': x, 'Y': y}, {'trans_x': transpose_x, 'trans_y': transpose_y}, x.dtype)

    def maximum(x, y, name=None):
        if not _in_legacy_graph():
            return paddle_ops['maximum'](x, y)
        return _append('elementwise_max', {'X': x, 'Y': y}, {'axis': -1}, x.dtype)

    def minimum(x, y, name=None):
        if not _in_legacy_graph():
            return paddle_ops['minimum'](x, y)
        return _append('elementwise_min', {'X': x, 'Y': y}, {'axis': -1}, x.dtype)

    def floor(x, name=None):
        if not _in_legacy_graph():
            return paddle_ops['floor'](x)
        return _append('floor', {'X': x}, {}, x.dtype)

    def argmax(x, axis=None, keepdim=False, dtype='int64', name=None):
        if not _in_legacy_graph():
            return paddle_ops['argmax'](x, axis=axis, keepdim=keepdim, dtype=dtype)
        dtype = convert_np_dtype_to_dtype_(dtype)
        return _append('arg_max', {'X': x}, {'axis': 0 if axis is None else axis, 'keepdims': keepdim,
                                             'flatten': axis is None, 'dtype': dtype}, dtype)

    def normalize(x, p=2, axis=1, epsilon=1e-12, name=None):
        if not _in_legacy_graph():
            return paddle_ops['normalize'](x, p=p, axis=axis, epsilon=epsilon)
        norm = _append('p_norm', {'X': x}, {'axis': axis, 'porder': float(p), 'keepdim': True,
                                            'epsilon': epsilon}, x.dtype)
        return paddle.divide(x, maximum(norm, paddle.full([1], epsilon, dtype=x.dtype)))

    return {'matmul': matmul, 'maximum': maximum, 'minimum': minimum, 'floor': floor, 'argmax': argmax,
            'normalize': normalize}


@contextlib.contextmanager
def legacy_operators():
    """Inside the block, the functions named in the module docstring also build legacy programs."""
    modules = {'normalize': F}
    paddle_ops = {name: getattr(modules.get(name, paddle), name)
                  for name in ('matmul', 'maximum', 'minimum', 'floor', 'argmax', 'normalize')}
    try:
        for name, function in _legacy_versions(paddle_ops).items():
            setattr(modules.get(name, paddle), name, function)
        yield
    finally:
        for name, function in paddle_ops.items():
            setattr(modules.get(name, paddle), name, function)
