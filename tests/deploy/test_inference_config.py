"""Paddle Inference settings per device and precision; the GPU branches are checked on the configs they build."""
import paddle
import pytest
from paddle import inference

from emanet.deploy import paddle_inference
from emanet.deploy.paddle_inference import FLOAT32_OPS, configure, inference_config
from emanet.models import EMAU


class RecordingConfig:
    """Stands in for inference.Config (whose GPU settings do nothing on a CPU build): records each call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))

    def called(self, name):
        return [args for method, args in self.calls if method == name]


def test_fp16_on_gpu_1_uses_that_gpu_and_keeps_the_em_unit_in_float32():
    config = configure(RecordingConfig(), 'gpu', 1, 'fp16')
    assert config.called('enable_use_gpu') == [(256, 1, inference.PrecisionType.Half)]
    assert config.called('exp_disable_mixed_precision_ops') == [(set(FLOAT32_OPS),)]
    assert config.called('delete_pass') == [('inplace_pass',)]
    assert not config.called('enable_mkldnn')


def test_fp32_on_gpu_needs_no_mixed_precision_list():
    config = configure(RecordingConfig(), 'gpu', 0, 'fp32')
    assert config.called('enable_use_gpu') == [(256, 0, inference.PrecisionType.Float32)]
    assert not config.called('exp_disable_mixed_precision_ops')


def test_plain_gpu_under_the_launcher_takes_the_processs_own_gpu(monkeypatch):
    monkeypatch.setenv('FLAGS_selected_gpus', '3')  # what paddle.distributed.launch gives rank 3
    config = configure(RecordingConfig(), 'gpu', None, 'fp32')
    assert config.called('enable_use_gpu') == [(256, 3, inference.PrecisionType.Float32)]


@pytest.mark.parametrize('precision, bf16_calls', [('fp32', 0), ('bf16', 1)])
def test_cpu_runs_onednn_without_the_inplace_pass(precision, bf16_calls, monkeypatch):
    monkeypatch.setattr(paddle_inference, 'bf16_kind', lambda: 'emulated')
    config = configure(RecordingConfig(), 'cpu', None, precision, cpu_threads=2)
    assert config.called('enable_mkldnn') == [()] and config.called('delete_pass') == [('inplace_pass',)]
    assert config.called('set_cpu_math_library_num_threads') == [(2,)]
    assert len(config.called('enable_mkldnn_bfloat16')) == bf16_calls
    assert not config.called('enable_use_gpu')


@pytest.mark.parametrize('kind, precision, message', [('gpu', 'bf16', 'bf16 runs on CPU only'),
                                                      ('cpu', 'fp16', 'fp16 runs on GPU only')])
def test_precisions_a_device_lacks_are_one_clear_error(kind, precision, message):
    with pytest.raises(ValueError, match=message):
        configure(RecordingConfig(), kind, None, precision)


def test_the_gpu_settings_are_accepted_by_a_real_config():
    # A CPU build ignores them, but a misspelt method or a wrong argument type would raise here.
    configure(inference.Config(), 'gpu', 1, 'fp16')


def test_a_gpu_on_a_cpu_build_and_a_bad_device_name_are_clear_errors(tmp_path):
    if paddle.is_compiled_with_cuda():
        pytest.skip('this Paddle has CUDA')
    with pytest.raises(RuntimeError, match='CPU-only'):
        inference_config('m.json', 'm.pdiparams', device='gpu:1')
    with pytest.raises(ValueError, match="'cpu', 'gpu' or 'gpu:N'"):
        inference_config('m.json', 'm.pdiparams', device='cuda')


def test_the_float32_list_names_the_operators_the_em_unit_is_made_of():
    paddle.seed(0)
    static = paddle.jit.to_static(EMAU(8, 4, stage_num=2), full_graph=True,
                                  input_spec=[paddle.static.InputSpec([None, 8, None, None], 'float32')])
    program = static.forward.concrete_program.main_program
    names = {op.name().split('.', 1)[1] for op in program.global_block().ops if op.name().startswith('pd_op.')}
    assert FLOAT32_OPS <= names  # each name is one the unit uses, spelt as the mixed-precision pass reads it
    assert {'matmul', 'softmax', 'p_norm'} <= FLOAT32_OPS
