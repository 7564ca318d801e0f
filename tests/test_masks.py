import pytest
import torch

from fast_dvla.masks import (BIDIRECTIONAL, BLOCK_CAUSAL, MASK_KINDS, AttentionLayout, block_ids, dense_mask,
                             flex_block_mask, to_additive, visible)


def brute_force(P, k, total):
    def blk(p):
        return -1 if p < P else (p - P) // k
    return torch.tensor([[blk(j) <= blk(i) for j in range(total)] for i in range(total)])


@pytest.mark.parametrize("P,k,L", [(3, 2, 6), (5, 7, 21), (1, 4, 4)])
def test_block_causal_matches_definition(P, k, L):
    full = dense_mask(P, k, 0, P + L, P + L)[0, 0]
    assert torch.equal(full, brute_force(P, k, P + L))
    assert full[:P, :P].all() and not full[:P, P:].any()      # prefix bidirectional, blind to actions
    assert full[P:, :P].all()                                  # actions see the prefix
    assert full[P:P + k, P:P + k].all()                        # bidirectional inside a block
    if L > k:
        assert not full[P:P + k, P + k:].any()                 # never a later block


def test_window_rows_equal_full_mask_rows():
    P, k, L = 4, 3, 12
    full = dense_mask(P, k, 0, P + L, P + L)[0, 0]
    win = dense_mask(P, k, P + 3, 6, P + 9)[0, 0]
    assert torch.equal(win, full[P + 3:P + 9, :P + 9])


def test_other_kinds_and_additive():
    assert dense_mask(2, 2, 0, 6, 6, BIDIRECTIONAL).all()
    add = to_additive(dense_mask(2, 2, 0, 6, 6))
    assert (add[dense_mask(2, 2, 0, 6, 6)] == 0).all()
    assert (add[~dense_mask(2, 2, 0, 6, 6)] == torch.finfo(torch.float32).min).all()
    with pytest.raises(TypeError):
        to_additive(add)
    with pytest.raises(ValueError, match="unknown mask kind"):
        visible(torch.arange(2), torch.arange(2), 1, 1, "sliding")
    with pytest.raises(ValueError, match="block_size"):
        block_ids(torch.arange(3), 1, 0)


def test_only_the_two_model_masks_exist():
    """Token-causal attention is no mask of this project's models: the layout refuses it
    (the tests that need a wrong mask build it themselves)."""
    assert MASK_KINDS == (BLOCK_CAUSAL, BIDIRECTIONAL)
    for kind in ("token_causal", "causal", None):
        with pytest.raises(ValueError, match="unknown mask kind"):
            AttentionLayout(2, 2, 0, 6, 6, kind)


def test_layout_is_validated():
    with pytest.raises(ValueError, match="block_size"):
        AttentionLayout(2, 0, 0, 6, 6)
    with pytest.raises(ValueError, match="bad layout"):
        AttentionLayout(2, 2, 4, 4, 6)          # queries past the keys
    with pytest.raises(ValueError, match="bad layout"):
        AttentionLayout(2, 2, 0, 0, 6)          # no queries


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_backend_form_comes_from_the_one_layout(kind):
    """The dense, additive and FlexAttention forms of a cached window are one rule: the rows of
    the full-sequence mask, memoised per layout and device."""
    P, k, L = 4, 3, 12
    layout = AttentionLayout(P, k, P + 3, 6, P + 9, kind)
    full = AttentionLayout.full(P, k, P + L, kind).dense_mask()[0, 0]
    dense = layout.dense_mask()
    assert dense.shape == (1, 1, 6, P + 9) and dense.dtype == torch.bool
    assert torch.equal(dense[0, 0], full[P + 3:P + 9, :P + 9])
    assert torch.equal(dense, dense_mask(P, k, P + 3, 6, P + 9, kind))
    assert layout.dense_mask() is dense and AttentionLayout(P, k, P + 3, 6, P + 9, kind).dense_mask() is dense
    add = layout.additive_mask(torch.float16)
    assert add.dtype == torch.float16 and torch.equal(add, to_additive(dense, torch.float16))
    mod = layout.flex_block_mask().mask_mod
    q = torch.arange(P + 9)
    got = torch.stack([mod(0, 0, i, q) for i in torch.arange(6)])
    assert torch.equal(got, dense[0, 0])


def test_fused_cache_len_only_for_cached_block_causal_windows():
    assert AttentionLayout(10, 7, 24, 14, 38, BLOCK_CAUSAL).fused_cache_len == 24
    assert AttentionLayout.full(10, 7, 38, BLOCK_CAUSAL).fused_cache_len is None      # prefix forward
    assert AttentionLayout(10, 7, 17, 7, 38, BIDIRECTIONAL).fused_cache_len is None  # the teacher
    assert AttentionLayout(10, 7, 17, 7, 52, BLOCK_CAUSAL).fused_cache_len is None   # reads past the window
    assert AttentionLayout(10, 7, 20, 8, 28, BLOCK_CAUSAL).fused_cache_len is None   # not at a block boundary


def test_key_valid_hides_padding():
    kv = torch.tensor([[True, False, True, True, True]])
    m = dense_mask(2, 3, 0, 5, 5, key_valid=kv)
    assert m.shape == (1, 1, 5, 5) and not m[0, 0, :, 1].any()


def test_flex_block_mask_agrees_with_dense():
    P, k, L = 5, 7, 21
    bm = flex_block_mask(P, k, 0, P + L, P + L)
    dense = bm.to_dense()  # [1, 1, q_blocks, kv_blocks] at 128-granularity: check via mask_mod instead
    assert dense.shape[0] == 1
    q = torch.arange(P + L)
    mod = bm.mask_mod
    got = torch.stack([mod(0, 0, i, q) for i in q])
    assert torch.equal(got, dense_mask(P, k, 0, P + L, P + L)[0, 0])
