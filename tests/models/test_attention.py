"""Attention layers against explicit O(N^2) evaluations of the same formulas (float64, tiny inputs)."""

from __future__ import annotations

import pytest
import torch

from medseg_diff.models.attention import LinearAttention3d, MaskPriorCrossAttention

HEADS, DIM_HEAD, DIM = 2, 4, 8


def explicit_linear_attention(attn: LinearAttention3d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output and its N x N matrices ``A = softmax_d(q) softmax_N(k)^T`` ``[B, h, N, N]``."""
    b, c = x.shape[:2]
    qkv = attn.to_qkv(attn.norm(x).reshape(b, c, -1))  # [B, 3*h*d, N]
    q, k, v = (t.reshape(b, HEADS, DIM_HEAD, -1).transpose(-1, -2) for t in qkv.chunk(3, dim=1))  # [B, h, N, d]
    matrix = q.softmax(dim=-1) @ k.softmax(dim=-2).transpose(-1, -2)  # [B, h, N, N]
    out = (matrix @ v).transpose(-1, -2).reshape(b, HEADS * DIM_HEAD, -1)  # [B, h*d, N]
    return x + attn.to_out(out).reshape(x.shape), matrix


@pytest.fixture
def linear_attention() -> LinearAttention3d:
    torch.manual_seed(0)
    return LinearAttention3d(DIM, heads=HEADS, dim_head=DIM_HEAD, norm_groups=4).double()


@pytest.mark.parametrize("spatial", [(3, 4, 5), (5, 6), (7,)], ids=["3d", "2d", "1d"])
def test_linear_attention_equals_explicit_matrix(linear_attention, spatial):
    x = torch.randn(2, DIM, *spatial, dtype=torch.float64)
    expected, _ = explicit_linear_attention(linear_attention, x)
    torch.testing.assert_close(linear_attention(x), expected)


def test_implicit_matrix_is_row_stochastic(linear_attention):
    _, matrix = explicit_linear_attention(linear_attention, torch.randn(2, DIM, 3, 4, 5, dtype=torch.float64))
    torch.testing.assert_close(matrix.sum(dim=-1), torch.ones(matrix.shape[:-1], dtype=torch.float64))


def test_received_attention_equals_column_sums(linear_attention):
    x = torch.randn(2, DIM, 3, 4, 5, dtype=torch.float64)
    _, matrix = explicit_linear_attention(linear_attention, x)
    expected = matrix.sum(dim=2).mean(dim=1).reshape(2, 1, 3, 4, 5)  # column sums, mean over heads
    received = linear_attention.received_attention(x)
    torch.testing.assert_close(received, expected)
    torch.testing.assert_close(received.mean(dim=(1, 2, 3, 4)), torch.ones(2, dtype=torch.float64))
    out, attention = linear_attention.forward_with_attention(x)
    torch.testing.assert_close(out, linear_attention(x))
    torch.testing.assert_close(attention, received)


@pytest.fixture
def cross_attention() -> MaskPriorCrossAttention:
    torch.manual_seed(0)
    return MaskPriorCrossAttention(DIM, token_dim=6, heads=HEADS, dim_head=DIM_HEAD, norm_groups=4).double()


def test_cross_attention_weights_sum_to_one(cross_attention):
    x, tokens = torch.randn(2, DIM, 4, 3, 5, dtype=torch.float64), torch.randn(2, 12, 6, dtype=torch.float64)
    weights = cross_attention.attention_weights(x, tokens)  # [B, h, N, M]
    assert weights.shape == (2, HEADS, 60, 12)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, HEADS, 60, dtype=torch.float64))


@pytest.mark.parametrize("chunk_elements", [2**24, 100], ids=["one-chunk", "many-chunks"])
def test_cross_attention_map_and_output(cross_attention, chunk_elements):
    cross_attention.chunk_elements = chunk_elements
    x, tokens = torch.randn(2, DIM, 4, 3, 5, dtype=torch.float64), torch.randn(2, 12, 6, dtype=torch.float64)
    out, attention = cross_attention.forward_with_attention(x, tokens, token_grid=(2, 3, 2))
    torch.testing.assert_close(out, cross_attention(x, tokens))  # explicit softmax == scaled_dot_product_attention
    weights = cross_attention.attention_weights(x, tokens)
    expected = (weights.mean(dim=(1, 2)) * 12).reshape(2, 1, 2, 3, 2)
    assert attention.shape == (2, 1, 2, 3, 2)
    torch.testing.assert_close(attention, expected)
    torch.testing.assert_close(attention.mean(dim=(1, 2, 3, 4)), torch.ones(2, dtype=torch.float64))


def test_cross_attention_map_without_grid(cross_attention):
    x, tokens = torch.randn(1, DIM, 2, 2, 2, dtype=torch.float64), torch.randn(1, 5, 6, dtype=torch.float64)
    _, attention = cross_attention.forward_with_attention(x, tokens)
    assert attention.shape == (1, 1, 5)


def test_attention_layers_are_residual_and_keep_shape(linear_attention, cross_attention):
    """With the output projection zeroed, both layers are the identity."""
    x = torch.randn(1, DIM, 4, 4, 4, dtype=torch.float64)
    for layer in (linear_attention, cross_attention):
        with torch.no_grad():
            layer.to_out.weight.zero_()
            layer.to_out.bias.zero_()
    torch.testing.assert_close(linear_attention(x), x)
    torch.testing.assert_close(cross_attention(x, torch.randn(1, 3, 6, dtype=torch.float64)), x)
