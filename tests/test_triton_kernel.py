"""The Triton kernel against SDPA on fresh random inputs (under the Triton
interpreter on a CPU: conftest.py sets TRITON_INTERPRET=1 before the kernel
module is imported), plus its input checks and the kernel benchmark's smoke mode.

Shapes are ones a GPU would accept (every dot dimension >= 16) and small
enough for the interpreter."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fast_dvla_kernels import triton_block_causal_attention
from fast_dvla_kernels import triton_block_attention as tba
from fast_dvla.masks import dense_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 must match exactly up to summation order; half precision up to its rounding (the GPU also rounds p to it)
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rule_mask(cache_len: int, n_q: int, block_size: int, in_flight: str = "block_causal") -> torch.Tensor:
    """[n_q, cache_len + n_q] straight from the contract: cache unmasked, then
    in-flight key j visible to query i iff j // block_size <= i // block_size."""
    i = torch.arange(n_q)[:, None]
    j = torch.arange(cache_len + n_q)[None, :] - cache_len  # in-flight index; negative = cache
    if in_flight == "bidirectional":
        return torch.ones(n_q, cache_len + n_q, dtype=torch.bool)
    if in_flight == "token_causal":
        return j <= i
    return (j < 0) | (torch.div(j, block_size, rounding_mode="floor") <= i // block_size)


def reference(q, k, v, cache_lens, block_size, in_flight="block_causal", key_starts=None):
    """fp32 SDPA per batch row (ragged lengths) on the dense mask, kv heads repeated; with
    ``key_starts``, row ``b``'s slots before ``key_starts[b]`` are left out (padding)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    starts = [0] * len(cache_lens) if key_starts is None else key_starts.tolist()
    for b, (c, s) in enumerate(zip(cache_lens.tolist(), starts)):
        n = c + q.shape[2]
        kk = k[b:b + 1, :, s:n].float().repeat_interleave(groups, 1)
        vv = v[b:b + 1, :, s:n].float().repeat_interleave(groups, 1)
        mask = rule_mask(c, q.shape[2], block_size, in_flight)[:, s:].to(q.device)
        out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1].float(), kk, vv, attn_mask=mask)
    return out


def random_case(batch, hq, hkv, n_q, d, dtype, seed, lens=(20, 61)):
    """Fresh inputs in a preallocated buffer whose unused tail is NaN: any read of it poisons the result."""
    g = torch.Generator().manual_seed(seed)
    cache_lens = torch.randint(lens[0], lens[1], (batch,), generator=g)
    slots = int(cache_lens.max()) + n_q + 5
    q = torch.randn(batch, hq, n_q, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, slots, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, slots, d, generator=g).to(DEVICE, dtype)
    for b, c in enumerate(cache_lens.tolist()):
        k[b, :, c + n_q:] = float("nan")
        v[b, :, c + n_q:] = float("nan")
    return q, k, v, cache_lens.to(DEVICE)


def max_err(out, ref):
    return (out.float() - ref).abs().max().item()


CASES = [  # batch, q heads, kv heads, queries, block size, head dim, dtype
    pytest.param(1, 2, 2, 7, 7, 32, torch.float32, id="b1-mha-1x7-fp32"),
    pytest.param(2, 4, 2, 14, 7, 64, torch.float32, id="b2-gqa2-2x7-d64-fp32"),
    pytest.param(3, 4, 1, 28, 7, 32, torch.float32, id="b3-gqa4-4x7-fp32"),
    pytest.param(2, 4, 4, 48, 16, 32, torch.float32, id="b2-mha-3x16-fp32"),
    pytest.param(2, 4, 2, 10, 7, 32, torch.float32, id="b2-gqa2-ragged-last-block-fp32"),
    pytest.param(2, 4, 2, 32, 16, 64, torch.float16, id="b2-gqa2-2x16-d64-fp16"),
    pytest.param(3, 8, 2, 21, 7, 32, torch.bfloat16, id="b3-gqa4-3x7-bf16"),
]


@pytest.mark.parametrize("batch,hq,hkv,n_q,block_size,d,dtype", CASES)
def test_kernel_matches_sdpa(batch, hq, hkv, n_q, block_size, d, dtype):
    q, k, v, lens = random_case(batch, hq, hkv, n_q, d, dtype, seed=batch * 100 + n_q)
    assert len(set(lens.tolist())) == batch  # ragged: every row its own cache length
    poisoned = torch.full_like(q, float("nan"))
    out = triton_block_causal_attention(q, k, v, lens, block_size, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr() and out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()  # every element written, and nothing read from the NaN tail
    err = max_err(out, reference(q, k, v, lens, block_size))
    assert err < TOL[dtype], err


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 64)])
def test_tile_sizes_do_not_change_the_result(block_m, block_n):
    """16-row tiles end inside a block (the in-flight loop stops early per tile);
    64-wide key tiles hold cache and more than the whole in-flight part."""
    q, k, v, lens = random_case(2, 4, 2, 21, 32, torch.float32, seed=7)
    out = torch.full_like(q, float("nan"))
    tba.launch(q, k, v, lens, 7, 32 ** -0.5, out, dict(BLOCK_M=block_m, BLOCK_N=block_n))
    assert torch.isfinite(out).all()
    assert max_err(out, reference(q, k, v, lens, 7)) < 1e-5


def test_engine_dense_mask_equals_the_kernel():
    """Equal cache lengths at a block boundary: the kernel is SDPA with fast_dvla.masks.dense_mask."""
    P, bs, cached_blocks, n_q = 13, 7, 3, 21
    c = P + cached_blocks * bs
    mask = dense_mask(P, bs, c, n_q, c + n_q)
    assert torch.equal(mask[0, 0], rule_mask(c, n_q, bs))  # the per-row rule used above is the engine's rule
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, n_q, 32, generator=g).to(DEVICE)
    k = torch.randn(2, 2, c + n_q, 32, generator=g).to(DEVICE)  # no spare slot: S == cache + Q exactly
    v = torch.randn(2, 2, c + n_q, 32, generator=g).to(DEVICE)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask.to(DEVICE))
    out = triton_block_causal_attention(q, k, v, torch.full((2,), c, device=DEVICE), bs)
    assert max_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_starts_skip_each_rows_padding(dtype):
    """Left-padded rows (docs/design.md#padded-batches): slots before a row's key start are NaN here, so
    any read of them poisons the result; the rest is the padding-free reference. A start equal to the
    cache length (an all-padding cache) leaves the in-flight keys alone."""
    q, k, v, lens = random_case(3, 4, 2, 14, 32, dtype, seed=13)
    starts = torch.stack([torch.tensor(0, device=lens.device), lens[1] // 2, lens[2]])
    for b, s in enumerate(starts.tolist()):
        k[b, :, :s] = float("nan")
        v[b, :, :s] = float("nan")
    out = triton_block_causal_attention(q, k, v, lens, 7, key_starts=starts.int())
    assert torch.isfinite(out).all()
    assert max_err(out, reference(q, k, v, lens, 7, key_starts=starts)) < TOL[dtype]
    # negative control: the same rows with the padding read (zeros instead of NaN, so the error is finite)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    unpadded = triton_block_causal_attention(q, k, v, lens, 7)
    assert max_err(unpadded, reference(q, k, v, lens, 7, key_starts=starts)) > 1e-2


def test_a_wrong_mask_would_be_caught():
    """The comparison has teeth: references with the in-flight part bidirectional
    or token-causal differ from the kernel by far more than the tolerance."""
    q, k, v, lens = random_case(2, 4, 2, 21, 32, torch.float32, seed=11)
    out = triton_block_causal_attention(q, k, v, lens, 7)
    assert max_err(out, reference(q, k, v, lens, 7)) < 1e-5
    for wrong in ("bidirectional", "token_causal"):
        assert max_err(out, reference(q, k, v, lens, 7, in_flight=wrong)) > 1e-2, wrong


def test_strided_views_and_default_scale():
    """q and k/v as views of [B, N, H, D] buffers (the transformers layout); an explicit scale."""
    g = torch.Generator().manual_seed(5)
    lens = torch.tensor([17, 40], device=DEVICE)
    q = torch.randn(2, 14, 4, 32, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 60, 2, 32, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, 60, 2, 32, generator=g).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    assert max_err(triton_block_causal_attention(q, k, v, lens, 7), reference(q, k, v, lens, 7)) < 1e-5
    scaled = triton_block_causal_attention(q, k, v, lens, 7, scale=0.5)
    assert max_err(scaled, reference(q * (0.5 * 32 ** 0.5), k, v, lens, 7)) < 1e-5


def test_unchecked_lengths_are_clamped_to_the_buffer():
    """check_lengths=False skips the host sync; a too-long cache length then
    reads at most up to the buffer's end (clamped), never past it."""
    q, k, v, _ = random_case(1, 2, 2, 7, 32, torch.float32, seed=2)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    S = k.shape[2]
    out = triton_block_causal_attention(q, k, v, torch.tensor([S + 50], device=DEVICE), 7, check_lengths=False)
    assert max_err(out, reference(q, k, v, torch.tensor([S - 7]), 7)) < 1e-5


def test_bad_inputs_raise_clear_errors():
    q, k, v, lens = random_case(2, 4, 2, 7, 32, torch.float32, seed=1)
    call = triton_block_causal_attention
    with pytest.raises(ValueError, match="multiple of kv heads"):
        call(q[:, :3], k, v, lens, 7)
    with pytest.raises(ValueError, match="too small"):  # S < max(cache_lens) + Q
        call(q, k[:, :, :20], v[:, :, :20], lens, 7)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        call(q, k, v[:, :, :-1], lens, 7)
    with pytest.raises(ValueError, match="batch size differs"):
        call(q[:1], k, v, lens[:1], 7)
    with pytest.raises(ValueError, match="head dim differs"):
        call(q[..., :16], k, v, lens, 7)
    with pytest.raises(ValueError, match="4D"):
        call(q[0], k, v, lens, 7)
    with pytest.raises(ValueError, match="share one of the dtypes"):
        call(q.half(), k, v, lens, 7)
    with pytest.raises(ValueError, match="share one of the dtypes"):
        call(q.double(), k.double(), v.double(), lens, 7)
    with pytest.raises(ValueError, match="cache_lens"):
        call(q, k, v, lens[:1], 7)
    with pytest.raises(ValueError, match="cache_lens"):
        call(q, k, v, lens.float(), 7)
    with pytest.raises(ValueError, match=">= 0"):
        call(q, k, v, -lens, 7)
    with pytest.raises(ValueError, match="block_size"):
        call(q, k, v, lens, 0)
    with pytest.raises(ValueError, match="out must match"):
        call(q, k, v, lens, 7, out=torch.empty_like(q[:, :2]))
    with pytest.raises(ValueError, match="key_starts must be an int32/int64 tensor"):
        call(q, k, v, lens, 7, key_starts=lens[:1])
    with pytest.raises(ValueError, match="key_starts must be an int32/int64 tensor"):
        call(q, k, v, lens, 7, key_starts=lens.float())
    with pytest.raises(ValueError, match=r"key_starts must lie in \[0, cache_lens\]"):
        call(q, k, v, lens, 7, key_starts=lens + 1)
    with pytest.raises(ValueError, match=r"key_starts must lie in \[0, cache_lens\]"):
        call(q, k, v, lens, 7, key_starts=-torch.ones_like(lens))


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the message is for CPU tensors")
    monkeypatch.setattr(tba, "INTERPRET", False)
    q, k, v, lens = random_case(1, 2, 2, 7, 32, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_block_causal_attention(q, k, v, lens, 7)


def test_gpu_tile_choices_are_legal():
    """What the wrapper would launch on a GPU: every dot dimension >= 16 and a
    power of two, small launches split into more tiles, big ones into fewer."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for head_dim in (32, 64, 96, 128, 256):
            for n_rows, n_programs in ((7, 1), (112, 8), (1024, 64), (4096, 256)):
                cfg = tba.pick_config(n_rows, n_programs, head_dim, dtype, n_sm=132)
                for key in ("BLOCK_M", "BLOCK_N"):
                    assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (dtype, head_dim, cfg)
                assert cfg["num_warps"] in (4, 8)
    assert tba.pick_config(112, 8, 128, torch.bfloat16, n_sm=132)["BLOCK_M"] == 16  # 1 row x 8 kv heads: fill SMs
    assert tba.pick_config(4096, 256, 128, torch.bfloat16, n_sm=132)["BLOCK_M"] == 64


AOT_COMPILE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fast_dvla_kernels as k
k.flash_block_causal_attention, k.merge_partials  # the flash module imports without flash_attn
from fast_dvla_kernels import triton_block_attention as tba
fn = tba._block_causal_fwd
names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
shapes = ((90, torch.bfloat16, 128, 112), (80, torch.float32, 64, 4096))
for (arch, dtype, head_dim, n_rows), padded in [(shape, padded) for padded in (False, True) for shape in shapes]:
    cfg = tba.pick_config(n_rows, 8, head_dim, dtype, n_sm=108)
    const = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1, HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], BLOCK_D=head_dim, UPCAST=False, IEEE=dtype == torch.float32,
                 HAS_KEY_STARTS=padded)
    sig = {n: "constexpr" if n in const else "*i32" if n in ("CacheLens", "KeyStarts") else "fp32"
           if n == "qk_scale" else "*" + names[dtype] if n in "QKVO" else "i32" for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n] != "constexpr"
               and n not in ("n_q", "n_slots", "n_kv_heads", "groups", "block_size", "qk_scale")}
    compiled = triton.compile(ASTSource(fn, sig, const, aligned), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    assert compiled.asm["cubin"], (arch, dtype)
    print("compiled", arch, names[dtype], head_dim, "key_starts" if padded else "", cfg)
"""


def test_kernel_compiles_for_gpus_without_one():
    """The interpreter misses what a GPU compiler rejects (dot shapes, layouts).
    Compile the kernel ahead of time for sm_80 and sm_90 at configurations the
    wrapper picks, with and without per-row key starts, in a process without
    TRITON_INTERPRET (so triton.jit builds a real kernel: this also proves the
    package imports there)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 4, done.stdout


def test_kernel_benchmark_smoke(tmp_path):
    """The GPU benchmark refuses to run without CUDA (exit code 2) unless
    --allow-cpu, which times sdpa and flex at a tiny shape and writes both files."""
    if torch.cuda.is_available():
        pytest.skip("the smoke mode is the CPU path")
    from fast_dvla.cli import main as cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["bench-kernels", "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2 and not (tmp_path / "never.json").exists()
    cli(["bench-kernels", "--allow-cpu", "--iters", "2", "--warmup", "1", "--quiet", "--out", str(tmp_path / "k")])
    result = json.loads((tmp_path / "k.json").read_text())
    assert result["device"] == "cpu" and result["torch"] == torch.__version__ and result["date"]
    assert [r["impl"] for r in result["rows"]] == ["sdpa", "flex"]
    for row in result["rows"]:
        assert row["max_err_vs_sdpa"] < 1e-5 and row["latency_us"] > 0 and row["gb_per_s"] > 0
    table = (tmp_path / "k.md").read_text()
    assert "| sdpa |" in table and "| flex |" in table
