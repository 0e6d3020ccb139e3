"""Tests for the pure-PyTorch NVFP4 fake quantization against real ModelOpt (no mocks)."""

from __future__ import annotations

import copy

import modelopt.torch.quantization as mtq
import pytest
import torch
import torch.nn.functional as F
from modelopt.torch.quantization import tensor_quant
from modelopt.torch.quantization.qtensor import nvfp4_tensor
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
from qatflow import nvfp4_cpu
from qatflow.nvfp4_cpu import fake_quant_nvfp4

BLOCK = 16
NVFP4_ARGS = (4, 2, 8, 4)  # num_bits, exponent_bits, scale_num_bits, scale_exponent_bits


@pytest.fixture
def nvfp4qtensor_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``NVFP4QTensor.quantize`` run on a CPU-only torch build.

    ModelOpt 0.43 asks ``fp4_compatible()`` (a Blackwell GPU, for an optional TensorRT-LLM
    fast path) by calling ``torch.cuda.get_device_capability`` unguarded, which raises
    without CUDA. Without a GPU the honest answer is False; the quantization arithmetic
    itself is ModelOpt's, untouched.
    """
    if not torch.cuda.is_available():
        monkeypatch.setattr(nvfp4_tensor, "fp4_compatible", lambda: False)


@pytest.fixture
def nvfp4_installed():
    """Install the CPU path for one test and restore the previous state afterwards."""
    was_installed = nvfp4_cpu.installed()
    nvfp4_cpu.install()
    yield
    if not was_installed:
        nvfp4_cpu.uninstall()


def modelopt_reference(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's own NVFP4 quantize -> dequantize with the per-tensor scale from ``amax``.

    The per-tensor scale is ``amax / (6 * 448)`` evaluated as ModelOpt's CUDA path does it
    (PyTorch on CUDA multiplies by the float32 reciprocal of a Python-scalar divisor).
    """
    wsf2 = amax.float() * (torch.tensor(1.0) / (6.0 * 448.0)).to(amax.device)
    qtensor, scale, scale_2 = NVFP4QTensor.quantize(x, BLOCK, weights_scaling_factor_2=wsf2)
    return qtensor.dequantize(
        dtype=x.dtype, scale=scale, double_scale=scale_2, block_sizes={-1: BLOCK}
    )


def make_input(shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if kind == "heavy_tailed":
        # Student-t with 2 degrees of freedom: normal / sqrt(chi2_2 / 2), outliers ~100x.
        chi2 = -2.0 * torch.log(torch.rand(shape, generator=gen).clamp_min(1e-12))
        x = x / torch.sqrt(chi2 / 2.0)
    elif kind == "zero_blocks":
        blocks = x.view(-1, BLOCK)
        blocks[::3] = 0.0
        blocks[1::5, : BLOCK // 2] = 0.0  # half-zero blocks too
    return x


def assert_regular_regime(x: torch.Tensor, amax: torch.Tensor) -> None:
    """Both ModelOpt paths (Triton kernel, NVFP4QTensor) agree only for blocks whose scale
    neither overflows nor underflows float8; make sure the test data stays there."""
    block_amax = x.float().abs().reshape(-1, BLOCK).amax(-1)
    nonzero = block_amax[block_amax > 0]
    assert float(amax) >= float(block_amax.max())
    assert float(nonzero.min()) / float(amax) > 1e-5
    assert float(nonzero.min()) > 1e-3


@pytest.mark.usefixtures("nvfp4qtensor_on_cpu")
@pytest.mark.parametrize("shape", [(4, 16), (3, 5, 64), (128, 2048)], ids=str)
@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "zero_blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("amax_factor", [1.0, 1.7], ids=["amax=max|x|", "amax>max|x|"])
def test_matches_modelopt_exactly(shape, kind, dtype, amax_factor):
    x = make_input(shape, kind, seed=len(shape) * 1000 + shape[-1]).to(dtype)
    amax = x.float().abs().amax() * amax_factor
    assert_regular_regime(x, amax)

    out = fake_quant_nvfp4(x, amax)
    ref = modelopt_reference(x, amax)

    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max().item() == 0.0
    assert not torch.equal(out, x)  # it did quantize


@pytest.mark.usefixtures("nvfp4qtensor_on_cpu")
def test_round_half_to_even_on_the_e2m1_grid():
    # amax = 6 * 448 makes the global scale 1; a block amax of 6 makes the block scale 1,
    # so values are rounded directly onto the grid {0, .5, 1, 1.5, 2, 3, 4, 6}.
    x = torch.tensor(
        [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 0.74, 2.6, 3.4, 5.1, 0.0, -2.5, -0.75]
    )
    expected = torch.tensor(
        [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 0.5, 3.0, 3.0, 6.0, 0.0, -2.0, -1.0]
    )
    amax = torch.tensor(6.0 * 448.0)
    torch.testing.assert_close(fake_quant_nvfp4(x, amax), expected, rtol=0, atol=0)
    torch.testing.assert_close(modelopt_reference(x, amax), expected, rtol=0, atol=0)


def test_values_above_amax_saturate_instead_of_overflowing_float8():
    # A calibrated amax below the data (e.g. an activation outlier) would overflow the
    # float8 block scale into NaN; the kernel clamps it to 448, so outputs clip at +-amax.
    x = make_input((8, 64), "normal", seed=1)
    amax = x.abs().amax() / 8.0
    out = fake_quant_nvfp4(x, amax)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.abs().max(), amax, rtol=1e-6, atol=0)


def test_all_zero_tensor_and_zero_amax_give_zeros():
    x = torch.zeros(2, 32, dtype=torch.bfloat16)
    out = fake_quant_nvfp4(x, torch.tensor(0.0))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, x)


def test_tiny_blocks_are_flushed_to_zero_like_the_kernel():
    # Effective block scales below 1e-5 become 1.0 in ModelOpt's Triton kernel, so such
    # blocks quantize to zero, and a block scale that underflows float8 does not divide by 0.
    x = make_input((2, 48), "normal", seed=2)
    x[0, :BLOCK] *= 1e-6  # underflows the float8 block scale
    x[1, BLOCK : 2 * BLOCK] *= 1e-5  # float8 scale representable, effective scale < 1e-5
    out = fake_quant_nvfp4(x, x.abs().amax())
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[0, :BLOCK]) == 0
    assert torch.count_nonzero(out[1, BLOCK : 2 * BLOCK]) == 0
    assert torch.count_nonzero(out[0, BLOCK:]) > 0


@pytest.mark.usefixtures("nvfp4qtensor_on_cpu")
@pytest.mark.parametrize("cols", [1, 20, 40])
def test_last_dim_not_multiple_of_block_is_zero_padded(cols):
    x = make_input((3, 48), "normal", seed=cols)[:, :cols]
    amax = x.abs().amax()
    padded = F.pad(x, (0, (-cols) % BLOCK))
    out = fake_quant_nvfp4(x, amax)
    assert out.shape == x.shape
    assert torch.equal(out, fake_quant_nvfp4(padded, amax)[:, :cols])
    assert torch.equal(out, modelopt_reference(padded, amax)[:, :cols])


def test_amax_with_several_elements_uses_its_maximum():
    x = make_input((4, 32), "normal", seed=3)
    per_row = x.abs().amax(dim=1, keepdim=True)
    assert torch.equal(fake_quant_nvfp4(x, per_row), fake_quant_nvfp4(x, per_row.max()))


def test_input_untouched_and_layout_independent():
    x = make_input((32, 48), "normal", seed=6).t()  # non-contiguous, last dim 32
    before = x.clone()
    amax = x.abs().amax()
    out = fake_quant_nvfp4(x, amax)
    assert torch.equal(x, before)
    assert torch.equal(out, fake_quant_nvfp4(x.contiguous(), amax))


def test_rejects_unsupported_dtype():
    with pytest.raises(TypeError, match="NVFP4"):
        fake_quant_nvfp4(torch.ones(16, dtype=torch.float64), torch.tensor(1.0))


def test_install_is_idempotent(nvfp4_installed):
    op = tensor_quant.dynamic_block_quantize_op
    nvfp4_cpu.install()
    assert nvfp4_cpu.installed()
    assert tensor_quant.dynamic_block_quantize_op is op
    assert nvfp4_cpu._original_op is not op  # the original is kept, not the wrapper


def test_installed_op_runs_nvfp4_on_cpu(nvfp4_installed):
    x = make_input((4, 64), "normal", seed=4).to(torch.bfloat16)
    amax = x.float().abs().amax()
    out = tensor_quant.dynamic_block_quantize_op(x, BLOCK, amax, *NVFP4_ARGS)
    assert torch.equal(out, fake_quant_nvfp4(x, amax))


@pytest.mark.parametrize(
    ("args", "name"),
    [((4, 2, 9, 8), "E2M1 values with E8M0 scales"), ((8, 4, 9, 8), "E4M3 values with E8M0")],
    ids=["MXFP4", "MXFP8"],
)
def test_other_formats_on_cpu_raise_not_implemented(nvfp4_installed, args, name):
    x = torch.randn(2, 32)
    with pytest.raises(NotImplementedError, match=name):
        tensor_quant.dynamic_block_quantize_op(x, 32, None, *args)


def _two_linear_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))


def test_mtq_nvfp4_qat_runs_on_cpu(nvfp4_installed):
    model = _two_linear_model()
    reference = copy.deepcopy(model)
    calib = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def forward_loop(m: torch.nn.Module) -> None:
        for batch in calib:
            m(batch)

    model = mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), forward_loop)
    first = model[0]
    assert first.weight_quantizer.is_enabled and first.input_quantizer.is_enabled

    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(100))
    y = model(x)
    with torch.no_grad():
        y_ref = reference(x)
        # The quantized layer is exactly F.linear over NVFP4-fake-quantized input and weight.
        expected_first = F.linear(
            fake_quant_nvfp4(x, first.input_quantizer.amax),
            fake_quant_nvfp4(first.weight, first.weight_quantizer.amax),
            first.bias,
        )
        assert torch.equal(first(x), expected_first)

    assert not torch.equal(y, y_ref)
    rel_err = ((y - y_ref).norm() / y_ref.norm()).item()
    assert 0.0 < rel_err < 0.25
    assert F.cosine_similarity(y.flatten(), y_ref.flatten(), dim=0).item() > 0.97

    # Straight-through gradients reach every weight, and a few QAT steps lower the loss.
    target = torch.randn(16, 32, generator=torch.Generator().manual_seed(101))
    optim = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        optim.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        for name, param in model.named_parameters():
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_go_to_the_original_op(nvfp4_installed):
    x = make_input((64, 256), "normal", seed=5).cuda().to(torch.bfloat16)
    amax = x.float().abs().amax()
    out = tensor_quant.dynamic_block_quantize_op(x, BLOCK, amax, *NVFP4_ARGS)
    assert out.is_cuda
    assert torch.equal(out, nvfp4_cpu._original_op(x, BLOCK, amax, *NVFP4_ARGS))
