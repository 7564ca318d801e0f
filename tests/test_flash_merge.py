"""The flash-attn path's pure-torch parts on the CPU: the log-sum-exp merge,
the in-flight partial, and the whole orchestration run against a stand-in
for ``flash_attn`` written here in plain torch (flash-attn itself needs CUDA)."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fast_dvla_kernels import flash_block_causal_attention, gather_inflight, inflight_partial, merge_partials


def partial(q, k, v, scale):
    """Plain-torch attention over some keys: (normalised output, log-sum-exp of the scores)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    return torch.softmax(scores, -1) @ v.float(), torch.logsumexp(scores, -1)


def block_causal_reference(q, k, v, cache_lens, block_size, scale):
    """fp32 SDPA per row on the mask written from the contract (cache unmasked, in-flight block-causal)."""
    groups = q.shape[1] // k.shape[1]
    n_q = q.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32)
    for b, c in enumerate(cache_lens.tolist()):
        i = torch.arange(n_q)[:, None]
        j = torch.arange(c + n_q)[None, :] - c
        mask = (j < 0) | (torch.div(j, block_size, rounding_mode="floor") <= i // block_size)
        kk = k[b:b + 1, :, :c + n_q].float().repeat_interleave(groups, 1)
        vv = v[b:b + 1, :, :c + n_q].float().repeat_interleave(groups, 1)
        out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1].float(), kk, vv, attn_mask=mask, scale=scale)
    return out


def test_merge_of_two_key_sets_is_softmax_over_their_union():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 3, 30, 16, generator=g),
               torch.randn(2, 3, 30, 16, generator=g))
    full = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    for cut in (1, 11, 29):
        out, lse = merge_partials(*partial(q, k[:, :, :cut], v[:, :, :cut], 0.3),
                                  *partial(q, k[:, :, cut:], v[:, :, cut:], 0.3))
        assert (out - full).abs().max() < 1e-5, cut
        assert (lse - torch.logsumexp((q @ k.transpose(-1, -2)) * 0.3, -1)).abs().max() < 1e-5
    # merging is associative: three parts in either grouping
    parts = [partial(q, k[:, :, a:b], v[:, :, a:b], 0.3) for a, b in ((0, 7), (7, 20), (20, 30))]
    left = merge_partials(*merge_partials(*parts[0], *parts[1]), *parts[2])
    right = merge_partials(*parts[0], *merge_partials(*parts[1], *parts[2]))
    assert (left[0] - full).abs().max() < 1e-5 and (right[0] - full).abs().max() < 1e-5


def test_merge_ignores_a_part_that_saw_no_key():
    g = torch.Generator().manual_seed(1)
    out_b, lse_b = partial(torch.randn(2, 4, 8, generator=g), torch.randn(2, 6, 8, generator=g),
                           torch.randn(2, 6, 8, generator=g), 1.0)
    empty_out = torch.full_like(out_b, float("nan"))  # SDPA gives NaN for a row with no visible key
    empty_lse = torch.full_like(lse_b, float("-inf"))
    out, lse = merge_partials(empty_out, empty_lse, out_b, lse_b)
    assert torch.equal(out, out_b) and torch.equal(lse, lse_b)
    out, lse = merge_partials(out_b, lse_b, empty_out, empty_lse)
    assert torch.equal(out, out_b)
    nothing, lse = merge_partials(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(nothing, torch.zeros_like(out_b)) and torch.isneginf(lse).all()


def test_merge_keeps_half_precision_outputs():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 2, 4, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g), torch.randn(
        1, 2, 9, 16, generator=g)
    (oa, la), (ob, lb) = partial(q, k[:, :, :4], v[:, :, :4], 0.25), partial(q, k[:, :, 4:], v[:, :, 4:], 0.25)
    out, _ = merge_partials(oa.half(), la, ob.half(), lb)
    assert out.dtype == torch.float16
    assert (out.float() - F.scaled_dot_product_attention(q, k, v, scale=0.25)).abs().max() < 2e-3


def test_inflight_partial_is_block_causal_sdpa_over_the_new_keys():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 17, 16, generator=g)  # 17 = 2 blocks of 7 + a ragged block of 3
    k, v = torch.randn(2, 2, 17, 16, generator=g), torch.randn(2, 2, 17, 16, generator=g)
    out, lse = inflight_partial(q, k, v, 7, 0.25)
    blk = torch.arange(17) // 7
    mask = blk[None, :] <= blk[:, None]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask,
                                         scale=0.25)
    assert (out - ref).abs().max() < 1e-5
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    assert (lse - torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)).abs().max() < 1e-5


def test_gather_inflight_reads_each_rows_own_slots():
    buf = torch.arange(2 * 3 * 20 * 4, dtype=torch.float32).reshape(2, 3, 20, 4)
    lens = torch.tensor([5, 11])
    got = gather_inflight(buf, lens, 6)
    assert torch.equal(got[0], buf[0, :, 5:11]) and torch.equal(got[1], buf[1, :, 11:17])


class FakeFlashAttn:
    """``flash_attn_with_kvcache`` as flash-attn 2 documents it, in plain torch:
    q [B, n, Hq, D], caches [B, S, Hkv, D] with a unit last stride, per-row
    ``cache_seqlens`` (int32); returns out [B, n, Hq, D] and, if asked, lse
    [B, Hq, n] in fp32. A row with no key gets out 0 and lse +inf, as flash-attn
    writes it."""

    def __init__(self):
        self.calls = []

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None,
                                causal=False, return_softmax_lse=False, **unused):
        assert k is None and v is None and not causal and not unused
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "flash-attn needs a unit last stride"
        assert cache_seqlens.dtype == torch.int32 and q.dtype in (torch.float16, torch.bfloat16)
        self.calls.append((tuple(q.shape), cache_seqlens.tolist()))
        B, n, Hq, D = q.shape
        groups = Hq // k_cache.shape[2]
        out = torch.zeros(B, n, Hq, D, dtype=q.dtype)
        lse = torch.full((B, Hq, n), float("inf"))
        for b, length in enumerate(cache_seqlens.tolist()):
            if length == 0:
                continue
            kk = k_cache[b, :length].float().repeat_interleave(groups, 1).transpose(0, 1)  # [Hq, L, D]
            vv = v_cache[b, :length].float().repeat_interleave(groups, 1).transpose(0, 1)
            o, s = partial(q[b].float().transpose(0, 1), kk, vv, softmax_scale)
            out[b], lse[b] = o.transpose(0, 1).to(q.dtype), s
        return (out, lse) if return_softmax_lse else out


@pytest.fixture
def fake_flash(monkeypatch):
    fake = FakeFlashAttn()
    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache = fake.flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return fake


@pytest.mark.parametrize("mode", ["per_block", "split", "auto"])
def test_flash_path_orchestration_matches_sdpa(fake_flash, mode):
    g = torch.Generator().manual_seed(4)
    lens = torch.tensor([0, 23, 40])  # ragged, one row with an empty cache
    n_q, bs = 21, 7
    q = torch.randn(3, 4, n_q, 32, generator=g).half()
    k = torch.randn(3, 2, 40 + n_q + 4, 32, generator=g).half()
    v = torch.randn(3, 2, 40 + n_q + 4, 32, generator=g).half()
    for b, c in enumerate(lens.tolist()):  # garbage past each row's in-flight tokens must not be read
        k[b, :, c + n_q:], v[b, :, c + n_q:] = float("nan"), float("nan")
    out = flash_block_causal_attention(q, k, v, lens, bs, scale=0.2, mode=mode)
    assert out.shape == q.shape and out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - block_causal_reference(q, k, v, lens, bs, 0.2)).abs().max() < 5e-3
    if mode == "per_block":  # one call per block, over the cache and the blocks up to it
        assert [c[1] for c in fake_flash.calls] == [[0 + e, 23 + e, 40 + e] for e in (7, 14, 21)]
    else:  # three blocks in flight: one call over the cache, the rest in torch
        assert fake_flash.calls == [((3, n_q, 4, 32), [0, 23, 40])]


def test_flash_auto_uses_one_call_for_one_block(fake_flash):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 7, 16, generator=g).bfloat16(), torch.randn(1, 2, 30, 16, generator=g).bfloat16(),
               torch.randn(1, 2, 30, 16, generator=g).bfloat16())
    lens = torch.tensor([12])
    out = flash_block_causal_attention(q, k, v, lens, 7)
    assert fake_flash.calls == [((1, 7, 2, 16), [19])]
    assert (out.float() - block_causal_reference(q, k, v, lens, 7, 16 ** -0.5)).abs().max() < 3e-2


def test_missing_flash_attn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail, installed or not
    q, k, v = torch.zeros(1, 2, 7, 16).half(), torch.zeros(1, 2, 20, 16).half(), torch.zeros(1, 2, 20, 16).half()
    with pytest.raises(ImportError, match=r"pip install flash-attn.*") as info:
        flash_block_causal_attention(q, k, v, torch.tensor([5]), 7)
    assert "CUDA" in str(info.value)


def test_flash_path_rejects_what_flash_attn_cannot_take(fake_flash):
    q, k, v = torch.zeros(1, 2, 7, 16), torch.zeros(1, 2, 20, 16), torch.zeros(1, 2, 20, 16)
    lens = torch.tensor([5])
    with pytest.raises(ValueError, match="fp16/bf16"):
        flash_block_causal_attention(q, k, v, lens, 7)
    with pytest.raises(ValueError, match="mode"):
        flash_block_causal_attention(q.half(), k.half(), v.half(), lens, 7, mode="fused")
    with pytest.raises(ValueError, match="divisible by 8"):
        flash_block_causal_attention(q[..., :12].half(), k[..., :12].half(), v[..., :12].half(), lens, 7)
    with pytest.raises(ValueError, match="too small"):
        flash_block_causal_attention(q.half(), k.half(), v.half(), torch.tensor([19]), 7)
    assert fake_flash.calls == []
