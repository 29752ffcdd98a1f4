"""Declaring families and checking configurations (no compile involved)."""

import pytest

from jitkern import dtypes
from jitkern.family import Entry, IntRange, KernelFamily, Param, iter_configs
from jitkern.families.selftest import SELFTEST


def make_family(**kw):
    args = dict(
        name="fam_under_test", source="selftest.cu",
        params=(Param("N", IntRange(16, 512, multiple_of=16)),
                Param("dtype", ("fp32", "bf16"), render=dtypes.C_TYPE),
                Param("tree", (False, True)),
                Param("HEAD", (64, 128), via="template")),
        entries={"k": Entry("ns::k<{HEAD}, {dtype}>", signature=(("p", "ptr"), ("n", "i32")))},
    )
    args.update(kw)
    return KernelFamily(**args)


def test_specialize_renders_macros_templates_and_name():
    fam = make_family()
    spec = fam.specialize(dict(N=128, dtype="bf16", tree=True, HEAD=64))
    assert spec.defines == ("-DJK_N=128", "-DJK_DTYPE=__nv_bfloat16", "-DJK_TREE=1")
    assert dict(spec.name_expressions) == {"k": "ns::k<64, __nv_bfloat16>"}
    assert spec.name == "fam_under_test/N=128,dtype=bf16,tree=1,HEAD=64"
    assert spec.config == (("HEAD", 64), ("N", 128), ("dtype", "bf16"), ("tree", True))
    # the same configuration in another order is the same (memoized) specialization
    assert fam.specialize(dict(HEAD=64, tree=True, dtype="bf16", N=128)) is spec


@pytest.mark.parametrize("config, message", [
    (dict(N=100, dtype="bf16", tree=True, HEAD=64),
     "parameter 'N' = 100 is not allowed; allowed values: multiples of 16 from 16 to 512"),
    (dict(N=1024, dtype="bf16", tree=True, HEAD=64), "parameter 'N' = 1024 is not allowed"),
    (dict(N=128, dtype="fp64", tree=True, HEAD=64),
     "parameter 'dtype' = 'fp64' is not allowed; allowed values: 'fp32', 'bf16'"),
    (dict(N=128, dtype="bf16", tree=1, HEAD=64),
     "parameter 'tree' = 1 is not allowed; allowed values: False, True"),
    (dict(N=128, dtype="bf16", tree=True, HEAD=True), "parameter 'HEAD' = True is not allowed"),
    (dict(N=128, dtype="bf16", tree=True), "parameter 'HEAD' is missing; allowed values: 64, 128"),
    (dict(N=128, dtype="bf16", tree=True, HEAD=64, extra=1),
     "unknown parameter 'extra'; parameters are N, dtype, tree, HEAD"),
])
def test_invalid_configuration_names_parameter_and_allowed_values(config, message):
    with pytest.raises(ValueError) as e:
        make_family().specialize(config)
    assert message in str(e.value)
    assert str(e.value).startswith("fam_under_test: ")


def test_cross_parameter_validation_runs_before_compile():
    def rule(cfg):
        if cfg["tree"] and cfg["N"] > 256:
            raise ValueError("fam_under_test: tree mode supports N up to 256")

    fam = make_family(validate=rule)
    with pytest.raises(ValueError, match="tree mode supports N up to 256"):
        fam.specialize(dict(N=512, dtype="bf16", tree=True, HEAD=64))


def test_defaults_fill_missing_parameters():
    spec = SELFTEST.specialize(dict(dtype="fp32"))
    assert dict(spec.config)["unroll"] == 1


def test_bad_declarations_are_rejected():
    with pytest.raises(ValueError, match="via must be 'define' or 'template'"):
        Param("x", (1,), via="macro")
    with pytest.raises(ValueError, match="signature field"):
        Entry("k", signature=(("x", "float"),))
    with pytest.raises(ValueError, match="duplicate parameter names"):
        make_family(params=(Param("a", (1,)), Param("a", (2,))))


def test_iter_configs_is_a_product():
    grid = iter_configs({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(grid) == 6 and {"a": 2, "b": "z"} in grid
