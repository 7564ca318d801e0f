"""The Triton kernel against SDPA with the dense mask, on fresh random inputs
(under the interpreter on a CPU), and the flash path's log-sum-exp merge."""
import os

import pytest
import torch
import torch.nn.functional as F

from fast_dvla.kernels import flash_block_causal_attention, merge_partials, triton_block_causal_attention
from fast_dvla.masks import dense_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rule_mask(cache_len, n_q, block_size, in_flight_kind="block_causal"):
    i = torch.arange(n_q)[:, None]
    j = torch.arange(cache_len + n_q)[None, :]
    if in_flight_kind == "bidirectional":
        return torch.ones(n_q, cache_len + n_q, dtype=torch.bool)
    return (j < cache_len) | ((j - cache_len) // block_size <= i // block_size)


def reference(q, k, v, cache_lens, block_size, kind="block_causal"):
    out = torch.empty_like(q, dtype=torch.float32)
    groups = q.shape[1] // k.shape[1]
    for b, c in enumerate(cache_lens.tolist()):
        n = c + q.shape[2]
        kk = k[b:b + 1, :, :n].float().repeat_interleave(groups, 1)
        vv = v[b:b + 1, :, :n].float().repeat_interleave(groups, 1)
        mask = rule_mask(c, q.shape[2], block_size, kind).to(q.device)
        out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1].float(), kk, vv, attn_mask=mask)
    return out


def random_case(batch, hq, hkv, n_blocks, block_size, dtype, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_q = n_blocks * block_size
    cache_lens = torch.randint(5, 60, (batch,), generator=g)
    slots = int(cache_lens.max()) + n_q + 3  # spare slots: never read
    q = torch.randn(batch, hq, n_q, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, slots, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, slots, d, generator=g).to(DEVICE, dtype)
    for b, c in enumerate(cache_lens.tolist()):  # poison the unused tail: it must not leak into results
        k[b, :, c + n_q:] = float("nan")
        v[b, :, c + n_q:] = float("nan")
    return q, k, v, cache_lens.to(DEVICE)


CASES = [  # batch, q heads, kv heads, blocks in flight, block size, dtype
    (1, 2, 2, 1, 7, torch.float32),
    (2, 4, 2, 2, 7, torch.float32),
    (3, 4, 1, 4, 7, torch.float32),
    (2, 4, 4, 3, 16, torch.float32),
    (2, 4, 2, 2, 16, torch.float16),
    (2, 8, 2, 3, 7, torch.bfloat16),
]


@pytest.mark.parametrize("batch,hq,hkv,n_blocks,block_size,dtype", CASES)
def test_kernel_matches_sdpa(batch, hq, hkv, n_blocks, block_size, dtype):
    q, k, v, lens = random_case(batch, hq, hkv, n_blocks, block_size, dtype, seed=batch * 7 + n_blocks)
    poisoned = torch.full_like(q, float("nan"))
    out = triton_block_causal_attention(q, k, v, lens, block_size, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr() and out.dtype == dtype
    assert torch.isfinite(out).all()  # every element overwritten, and nothing read from the NaN tail
    err = (out.float() - reference(q, k, v, lens, block_size)).abs().max().item()
    assert err < TOL[dtype], err


def test_kernel_equals_the_engines_dense_mask():
    """Equal cache lengths at a block boundary: the kernel is SDPA with fast_dvla.masks.dense_mask."""
    P, bs, cached_blocks, n_q = 9, 7, 2, 14
    c = P + cached_blocks * bs
    q = torch.randn(2, 4, n_q, 32, device=DEVICE)
    k = torch.randn(2, 2, c + n_q, 32, device=DEVICE)
    v = torch.randn(2, 2, c + n_q, 32, device=DEVICE)
    mask = dense_mask(P, bs, c, n_q, c + n_q, device=DEVICE)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    out = triton_block_causal_attention(q, k, v, torch.full((2,), c, device=DEVICE), bs)
    assert (out - ref).abs().max().item() < 1e-5


def test_a_wrong_mask_would_be_caught():
    q, k, v, lens = random_case(2, 4, 2, 3, 7, torch.float32, seed=11)
    out = triton_block_causal_attention(q, k, v, lens, 7)
    wrong = reference(q, k, v, lens, 7, kind="bidirectional")
    assert (out - wrong).abs().max().item() > 1e-2


def test_bad_inputs_are_named():
    q, k, v, lens = random_case(2, 4, 2, 1, 7, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        triton_block_causal_attention(q[:, :3], k, v, lens, 7)
    with pytest.raises(ValueError, match="exceed"):
        triton_block_causal_attention(q, k[:, :, :10], v[:, :, :10], lens, 7)
    with pytest.raises(ValueError, match="share one of"):
        triton_block_causal_attention(q.double(), k.double(), v.double(), lens, 7)
    with pytest.raises(ValueError, match="cache_lens"):
        triton_block_causal_attention(q, k, v, lens[:1], 7)
    with pytest.raises(ValueError, match="4D"):
        triton_block_causal_attention(q[0], k, v, lens, 7)


def test_merge_partials_is_exact_softmax_over_the_union():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 12, 16), torch.randn(2, 3, 12, 16)

    def part(keys, values):
        scores = q @ keys.transpose(-1, -2) / 4.0
        return torch.softmax(scores, -1) @ values, torch.logsumexp(scores, -1)

    merged, lse = merge_partials(*part(k[:, :, :7], v[:, :, :7]), *part(k[:, :, 7:], v[:, :, 7:]))
    full, full_lse = part(k, v)
    assert (merged - full).abs().max() < 1e-5 and (lse - full_lse).abs().max() < 1e-5
    empty_out, empty_lse = torch.zeros(2, 3, 5, 16), torch.full((2, 3, 5), float("-inf"))
    alone, _ = merge_partials(empty_out, empty_lse, full, full_lse)
    assert torch.allclose(alone, full)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without flash-attn")
def test_flash_path_says_what_to_install():
    q, k, v, lens = random_case(1, 2, 2, 1, 7, torch.float32)
    with pytest.raises(ImportError, match="flash-attn"):
        flash_block_causal_attention(q, k, v, lens, 7)


def test_kernel_benchmark_script_runs(tmp_path):
    from fast_dvla.eval import bench_kernels

    if torch.cuda.is_available():
        pytest.skip("the smoke run is the CPU path")
    with pytest.raises(SystemExit):
        bench_kernels.main(["--out", str(tmp_path / "k")])
    bench_kernels.main(["--allow-cpu", "--iters", "2", "--out", str(tmp_path / "k")])
    import json
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"sdpa", "flex"} and all(r["max_err_vs_sdpa"] < 1e-5 for r in rows)
