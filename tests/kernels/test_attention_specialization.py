"""The attention kernel is not specialized on arguments that change from step to step (the batch's request count,
the block table's width): a new "divisible by 16" pattern of them would otherwise compile a new variant in the
middle of serving, stalling every request for the compile."""
import pytest

pytest.importorskip("triton")

from serval.kernels import triton_attention  # noqa: E402

STEP_VARYING = {"num_seqs", "stride_block_table"}


def test_step_varying_arguments_are_not_specialized():
    kernel = triton_attention._attention_kernel
    # A JITFunction keeps the list; Triton's interpreter's stand-in keeps the decorator's arguments.
    not_specialized = kernel.kwargs["do_not_specialize"] if hasattr(kernel, "kwargs") else kernel.do_not_specialize
    assert STEP_VARYING <= set(kernel.arg_names)
    assert STEP_VARYING <= set(not_specialized)
    # The model's fixed shapes stay specialized (they feed vectorized addresses).
    assert "stride_query_token" not in not_specialized
