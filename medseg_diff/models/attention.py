"""Attention layers of the denoiser and the attention maps they expose.

Two layers, both pre-norm with a residual connection, both dimension-agnostic (``x`` is ``[B, C, *spatial]``):

* :class:`LinearAttention3d` -- Efficient Attention (Shen et al., "Efficient Attention: Attention with Linear
  Complexities", WACV 2021): ``q`` softmax over its features, ``k`` softmax over positions, context
  ``k^T v`` (``d x d`` per head), output ``q . context``. Cost O(N d^2); no ``N x N`` matrix is formed.
* :class:`MaskPriorCrossAttention` -- softmax attention of denoiser voxels (queries) over mask-prior tokens
  (keys / values). At most ``queries x tokens`` weights are formed, and only when a map is requested.

**Attention-map units ("times uniform within the window").** Every map is scaled so that its mean over its grid
(the window the layer sees) is 1: a value of 3 means "this voxel (token) gets three times the average share of
this window's attention". The maps are therefore relative to the window: a bright structure in the window lowers
every other voxel's value. ``inference.sliding_window.AttentionStitcher`` turns the per-window maps of a volume
into one map without seams, in units of the head's average.

* Linear self-attention (**attention received**): the implicit matrix per head is
  ``A = softmax_d(q) softmax_N(k)^T`` (``N x N``), i.e. ``A_ij = sum_d q_id k_jd``, the share of query ``i``'s
  attention that goes to position ``j``. Its rows sum to 1 (``sum_j k_jd = 1`` and ``sum_d q_id = 1``), so the column
  sums ``c_j = sum_i A_ij = sum_d (sum_i q_id) k_jd`` -- the attention voxel ``j`` *receives* from all positions of
  the window -- add up to ``N`` and average to 1. They are computed in O(N d) from the factorised form, then
  averaged over heads.
* Cross-attention (**attention mass on the prior**): each query voxel's softmax weights over the ``M`` prior
  tokens sum to 1; the map at token ``m`` is the weight that token receives, averaged over all query voxels and
  heads, times ``M`` (on the token grid, i.e. at the token's place in the window).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from medseg_diff.models.blocks import group_norm


class AttentionOutput(NamedTuple):
    """Output of an attention layer plus its map.

    out:       same shape as the layer's input ``[B, C, *spatial]``
    attention: ``[B, 1, *grid]`` in "times uniform" units (mean 1); ``grid`` is the query grid for
               self-attention, the token grid for cross-attention
    """

    out: Tensor
    attention: Tensor


def _flatten_space(x: Tensor) -> Tensor:
    """``[B, C, *spatial] -> [B, C, N]``."""
    return rearrange(x, "b c ... -> b c (...)")


class LinearAttention3d(nn.Module):
    """Efficient (linear) self-attention over all positions of ``x [B, dim, *spatial]``, with a residual.

    ``forward(x) -> [B, dim, *spatial]``; ``forward_with_attention(x)`` also returns the received-attention map
    ``[B, 1, *spatial]``; ``received_attention(x)`` returns only the map.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, norm_groups: int = 8):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.norm = group_norm(dim, norm_groups)
        self.to_qkv = nn.Conv1d(dim, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv1d(hidden, dim, 1)

    def normalized_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(q, k, v)``, each ``[B, h, d, N]``: ``q`` softmax over ``d``, ``k`` softmax over ``N``, ``v`` raw."""
        qkv = self.to_qkv(_flatten_space(self.norm(x)))
        q, k, v = rearrange(qkv, "b (three h d) n -> three b h d n", three=3, h=self.heads)
        return q.softmax(dim=-2), k.softmax(dim=-1), v

    def _attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``x + to_out(q . (k^T v))`` without the ``N x N`` matrix; ``-> x.shape``."""
        context = einsum(k, v, "b h d n, b h e n -> b h d e")  # [B, h, d, d]
        out = einsum(context, q, "b h d e, b h d n -> b h e n")  # [B, h, d, N]
        out = self.to_out(rearrange(out, "b h e n -> b (h e) n"))
        return x + out.reshape(x.shape)

    @staticmethod
    def _received(x: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Column sums of ``A = q^T k`` averaged over heads, ``[B, 1, *spatial]``, mean 1 (see module doc)."""
        dtype = torch.promote_types(q.dtype, torch.float32)  # at least fp32 under autocast
        q_total = q.to(dtype).sum(dim=-1)  # [B, h, d]: sum over queries i of q_id
        received = einsum(q_total, k.to(dtype), "b h d, b h d n -> b n") / q.shape[1]
        return received.reshape(x.shape[0], 1, *x.shape[2:])

    def forward(self, x: Tensor) -> Tensor:
        return self._attend(x, *self.normalized_qkv(x))

    def forward_with_attention(self, x: Tensor) -> AttentionOutput:
        q, k, v = self.normalized_qkv(x)
        return AttentionOutput(self._attend(x, q, k, v), self._received(x, q, k))

    def received_attention(self, x: Tensor) -> Tensor:
        """The attention each position receives, ``[B, 1, *spatial]``, "times uniform" units (mean 1)."""
        q, k, _ = self.normalized_qkv(x)
        return self._received(x, q, k)


class MaskPriorCrossAttention(nn.Module):
    """Softmax cross-attention from feature voxels to mask-prior tokens, with a residual.

    ``x [B, dim, *spatial]`` (queries, N positions), ``tokens [B, M, token_dim]`` (keys and values)
    ``-> [B, dim, *spatial]``. ``forward`` uses ``scaled_dot_product_attention`` (fused kernels where available);
    ``forward_with_attention`` evaluates the softmax explicitly, in chunks of queries, to also return where the
    queries put their mass: ``[B, 1, *token_grid]`` (or ``[B, 1, M]`` without a grid), mean 1.
    """

    def __init__(
        self,
        dim: int,
        token_dim: int,
        heads: int = 4,
        dim_head: int = 32,
        norm_groups: int = 8,
        chunk_elements: int = 2**24,
    ):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        self.chunk_elements = chunk_elements
        hidden = heads * dim_head
        self.norm = group_norm(dim, norm_groups)
        self.token_norm = nn.LayerNorm(token_dim)
        self.to_q = nn.Linear(dim, hidden, bias=False)
        self.to_kv = nn.Linear(token_dim, 2 * hidden, bias=False)
        self.to_out = nn.Linear(hidden, dim)

    def qkv(self, x: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q [B, h, N, d]`` from voxels; ``k, v [B, h, M, d]`` from tokens.

        Projected position-major so that ``d`` has stride 1, which the fused SDPA kernels require.
        """
        q = self.to_q(rearrange(self.norm(x), "b c ... -> b (...) c"))
        q = rearrange(q, "b n (h d) -> b h n d", h=self.heads)
        kv = self.to_kv(self.token_norm(tokens))
        k, v = rearrange(kv, "b m (two h d) -> two b h m d", two=2, h=self.heads)
        return q, k, v

    def _merge(self, x: Tensor, out: Tensor) -> Tensor:
        """``x + to_out(out)`` with ``out [B, h, N, d]`` -> ``x.shape``."""
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return x + rearrange(out, "b n c -> b c n").reshape(x.shape)

    def attention_weights(self, x: Tensor, tokens: Tensor) -> Tensor:
        """Explicit weights ``[B, h, N, M]`` (each query's weights over tokens sum to 1). For small inputs."""
        q, k, _ = self.qkv(x, tokens)
        return self._weights(q, k)

    def _weights(self, q: Tensor, k: Tensor) -> Tensor:
        return (einsum(q, k, "b h n d, b h m d -> b h n m") * self.scale).softmax(dim=-1)

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        q, k, v = self.qkv(x, tokens)
        return self._merge(x, F.scaled_dot_product_attention(q, k, v, scale=self.scale))

    def forward_with_attention(
        self, x: Tensor, tokens: Tensor, token_grid: tuple[int, ...] | None = None
    ) -> AttentionOutput:
        q, k, v = self.qkv(x, tokens)
        batch, heads, n_queries, _ = q.shape
        n_tokens = k.shape[2]
        chunk = max(1, self.chunk_elements // (batch * heads * n_tokens))
        dtype = torch.promote_types(q.dtype, torch.float32)  # accumulate the map in at least fp32
        outs, mass = [], torch.zeros(batch, n_tokens, device=x.device, dtype=dtype)
        for start in range(0, n_queries, chunk):
            w = self._weights(q[:, :, start : start + chunk], k)  # [B, h, n, M]
            outs.append(einsum(w.to(v.dtype), v, "b h n m, b h m d -> b h n d"))
            mass = mass + w.to(dtype).sum(dim=(1, 2))
        attention = mass * (n_tokens / (heads * n_queries))  # mean over queries and heads, times M
        grid = tuple(token_grid) if token_grid is not None else (n_tokens,)
        return AttentionOutput(self._merge(x, torch.cat(outs, dim=2)), attention.reshape(batch, 1, *grid))
