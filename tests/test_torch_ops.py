"""The torch.library registration helper (CPU: registration and the fake implementation)."""

import pytest

torch = pytest.importorskip("torch")

from jitkern.torch_ops import custom_op  # noqa: E402


@custom_op("jitkern::_test_scale_into", mutates_args=("out",), device_types=None)
def _scale_into(x: torch.Tensor, out: torch.Tensor, s: float) -> None:
    out.copy_(x * s)


def test_registered_op_runs_and_is_reachable_through_torch_ops():
    x = torch.randn(5)
    out = torch.empty(5)
    torch.ops.jitkern._test_scale_into(x, out, 2.0)
    assert torch.equal(out, x * 2.0)


def test_fake_implementation_supports_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 4)
        out = torch.empty(3, 4)
        assert _scale_into(x, out, 1.0) is None


def test_opcheck_passes():
    x = torch.randn(4)
    torch.library.opcheck(_scale_into, (x, torch.empty(4), 3.0))


def test_compiles_under_torch_compile():
    def f(x, out):
        _scale_into(x, out, 0.5)
        return out + 1

    x = torch.randn(6)
    got = torch.compile(f, backend="eager", fullgraph=True)(x, torch.empty(6))
    assert torch.allclose(got, x * 0.5 + 1)
