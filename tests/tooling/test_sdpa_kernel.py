"""benchmarks/sdpa_kernel.py: the long-context rows assume the CPU runs the memory-efficient SDPA kernel for the
benchmark model's attention (causal, no mask, grouped-query). SDPA picks its kernel from dtypes, shapes' ranks,
masks and dropout, not from T, so a short length checks the same dispatch as the committed 131072-token run."""

import pytest

pytest.importorskip("transformers")

from benchmarks import sdpa_kernel  # noqa: E402


def test_flash_kernel_and_no_square_tensor():
    r = sdpa_kernel.measure(300)
    assert r["sdpa_ops"] == ["_scaled_dot_product_flash_attention_for_cpu",
                             "_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert r["square_tensor_ops"] == []
    assert r["largest_tensor_bytes"] < 300 * 300 * 4 * 4  # smaller than the 4 heads' [T, T] fp32 scores


def test_math_kernel_would_be_caught():
    """With only the math backend allowed, SDPA materialises the scores: the check must see it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel as only

    with only([SDPBackend.MATH]):
        r = sdpa_kernel.measure(300)
    assert not any("flash" in op for op in r["sdpa_ops"])
    assert r["square_tensor_ops"]
