"""Padded batches (docs/design.md#padded-batches): prefixes of different lengths, left-padded to one
length with ``decode(..., prefix_mask=)``, decode every row exactly as that row alone with only its
real prefix, for every decoder, cached and uncached, dynamic and static, on every backend that runs
here; negative controls show the comparison catches padding left visible and positions left
unshifted; bad masks are refused by name."""
import collections

import pytest
import torch

from fast_dvla import DecodeConfig, decode
from fast_dvla.attention import backends, unavailable_reason, use_backend
from fast_dvla.config import METHODS
from fast_dvla.decoding import common
from fast_dvla.masks import BIDIRECTIONAL, BLOCK_CAUSAL, AttentionLayout, to_additive
from helpers import AbsolutePositionDVLA, ScriptedModel, left_padded_batch, random_prefix, scripted_prefix, tiny_model

SHARP = 8.0
FLOAT32_NOISE = 1e-4  # as in test_exactness: visible padding or unshifted positions move logits by > 1e-3
BATCH = 4
STUDENT_METHODS = ("block_diffusion", "fast_dvla", "vanilla_cached")
BACKENDS = [b for b in ("eager", "flex", "triton") if unavailable_reason(b) is None]


# -- comparing a row of a padded batch with the row alone ---------------------------------------
def forwards(trace, chunk_len, block_size):
    """``{key: (first chunk slot, logits)}`` per forward of a traced decode. The key pairs the same
    forward of two decodes of one row: the step, or for ``fast_dllm`` (whose blocks run as many
    forwards as the batch's slowest row needs) the block and the forward within it."""
    out, per_block = {}, collections.Counter()
    for step, entry in enumerate(trace):
        logits = entry["logits"]
        if "block" in entry:  # fast_dllm
            a0 = entry["block"][0]
            out[a0, per_block[a0]] = (a0, logits)
            per_block[a0] += 1
        elif "window_blocks" in entry:  # the pipelined decoders
            out[step] = (entry["window_blocks"][0] * block_size, logits)
        else:  # vanilla, vanilla_cached: the window runs to the chunk's end
            out[step] = (chunk_len - logits.shape[1], logits)
    return out


def row_logit_gap(batch_trace, row, alone_trace, chunk_len, block_size):
    """Largest difference between the logits the row computed alone and its row of the batch's same
    forward, over the slots the row alone computed (the batch's window always covers them)."""
    batch = forwards(batch_trace, chunk_len, block_size)
    alone = forwards(alone_trace, chunk_len, block_size)
    assert alone.keys() <= batch.keys()  # the batch runs every forward the row needs, and maybe more
    gap = 0.0
    for key, (a0, la) in alone.items():
        b0, lb = batch[key]
        a1 = a0 + la.shape[1]
        assert b0 <= a0 and a1 <= b0 + lb.shape[1]
        gap = max(gap, (la[0] - lb[row, a0 - b0:a1 - b0]).abs().max().item())
    return gap


def decode_traced(model, prefix, config, prefix_mask=None):
    trace = []
    return decode(model, prefix, config, trace=trace, prefix_mask=prefix_mask), trace


def assert_rows_decode_alone(model, prefix, mask, lengths, config):
    """Every row of the padded batch: the tokens, commits and logits of the row decoded alone."""
    assert not mask.all()  # the batch really is padded
    batch, batch_trace = decode_traced(model, prefix, config, mask)
    P, L, k = prefix.shape[1], model.chunk_len, model.block_size
    for row, n in enumerate(lengths):
        alone, alone_trace = decode_traced(model, prefix[row:row + 1, P - n:], config)
        assert torch.equal(batch.tokens[row], alone.tokens[0]), (row, n)
        assert row_logit_gap(batch_trace, row, alone_trace, L, k) < FLOAT32_NOISE, (row, n)
        if config.method != "fast_dllm":  # the same commits at the same steps, then none while others finish
            steps = alone.stats.nfe
            assert torch.equal(batch.stats.committed_matrix()[:steps, row], alone.stats.committed_matrix()[:, 0])
            assert not batch.stats.committed_matrix()[steps:, row].any()
    assert len({tuple(t) for t in batch.tokens.tolist()}) == len(lengths)  # rows decode differently
    return batch


# -- every decoder, cached and uncached, dynamic and static -------------------------------------
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("method", METHODS)
def test_each_row_of_a_padded_batch_decodes_as_it_would_alone(method, use_cache, static):
    seed = METHODS.index(method) * 4 + 2 * use_cache + static
    model = tiny_model(seed, sharpness=SHARP)
    prefix, mask, lengths = left_padded_batch(model, BATCH, seed)
    config = DecodeConfig(method=method, tau_conf=0.3, use_cache=use_cache, static_shapes=static)
    assert_rows_decode_alone(model, prefix, mask, lengths, config)


@pytest.mark.parametrize("method", STUDENT_METHODS)
def test_padded_cached_equals_padded_uncached(method):
    """The exact cache holds in a padded batch: its padding slots, cached with the prefix, stay hidden."""
    model = tiny_model(21, sharpness=SHARP)
    prefix, mask, _ = left_padded_batch(model, BATCH, 21)
    config = DecodeConfig(method=method, tau_conf=0.3)
    cached, trace_c = decode_traced(model, prefix, config, mask)
    full, trace_f = decode_traced(model, prefix, config.replace(use_cache=False), mask)
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.stats.nfe == full.stats.nfe and cached.stats.query_tokens < full.stats.query_tokens
    for a, b in zip(trace_c, trace_f):
        la = a["logits"]
        lb = b["logits"][:, -la.shape[1]:] if method == "vanilla_cached" else b["logits"]
        assert (la - lb).abs().max().item() < FLOAT32_NOISE


@pytest.mark.parametrize("method", METHODS)
def test_rows_decode_alone_with_absolute_positions(method):
    """A backbone that reads absolute positions: only positions shifted back by each row's padding
    give the row alone (the negative control below drops the shift)."""
    model = tiny_model(31, sharpness=SHARP, model_class=AbsolutePositionDVLA)
    prefix, mask, lengths = left_padded_batch(model, BATCH, 31)
    assert_rows_decode_alone(model, prefix, mask, lengths, DecodeConfig(method=method, tau_conf=0.3))


# static_shapes changes nothing for the teacher's decoders
BACKEND_CASES = [pytest.param(backend, method, static, id=f"{backend}-{method}-{'static' if static else 'dynamic'}")
                 for backend in BACKENDS for method in METHODS
                 for static in ((False, True) if method in STUDENT_METHODS else (False,))]


@pytest.mark.parametrize("backend,method,static", BACKEND_CASES)
def test_rows_decode_alone_on_every_backend(backend, method, static):
    """eager (additive mask), flex (per-row BlockMask) and triton (per-row key starts in the kernel,
    under the interpreter on a CPU) on the cached decoders."""
    model = tiny_model(41, sharpness=SHARP)
    prefix, mask, lengths = left_padded_batch(model, 3, 41)
    use_backend(model, backend)
    assert_rows_decode_alone(model, prefix, mask, lengths, DecodeConfig(method=method, tau_conf=0.3,
                                                                        static_shapes=static))


def test_triton_runs_padded_windows_in_its_kernel(monkeypatch):
    """The padded cached windows reach the fused kernel with each row's key start, not SDPA."""
    if "triton" not in BACKENDS:
        pytest.skip(unavailable_reason("triton"))
    import fast_dvla_kernels

    starts = []
    kernel = fast_dvla_kernels.triton_block_causal_attention

    def spy(*args, key_starts=None, **kwargs):
        starts.append(None if key_starts is None else key_starts.tolist())
        return kernel(*args, key_starts=key_starts, **kwargs)

    monkeypatch.setattr(fast_dvla_kernels, "triton_block_causal_attention", spy)
    model = tiny_model(42, sharpness=SHARP)
    prefix, mask, lengths = left_padded_batch(model, 3, 42)
    use_backend(model, "triton")
    decode(model, prefix, DecodeConfig(method="fast_dvla", tau_conf=0.3), prefix_mask=mask)
    P = prefix.shape[1]
    assert starts and all(s == [P - n for n in lengths] for s in starts)


def test_flash_runs_padded_windows_on_sdpa_with_the_dense_mask():
    """flash-attn cannot run here, and its path takes no key starts: a padded cached window, which it
    would otherwise send to its kernel, goes to SDPA with the dense mask (no flash import needed)."""
    layout = AttentionLayout(10, 7, 24, 14, 38, BLOCK_CAUSAL, pad_lens=(0, 3, 9))
    assert layout.fused_cache_len == 24
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for n in (14, 38, 38))
    k, v = k[:, :2], v[:, :2]
    out, _ = backends.flash_attention(None, q, k, v, None, scaling=0.25, fast_dvla_layout=layout)
    ref, _ = backends.sdpa_attention(None, q, k, v, None, scaling=0.25, fast_dvla_layout=layout)
    assert torch.equal(out, ref)


# -- negative controls ---------------------------------------------------------------------------
class PaddingBlindLayout(AttentionLayout):
    """A layout that drops the padding: padding keys visible to every query, as without a mask."""

    def __init__(self, *shape, pad_lens=None):
        super().__init__(*shape)


def first_forward_gap(model, prefix, mask, lengths, config):
    """Largest difference between a row's logits in the batch's first forward and alone (a broken
    decode's later forwards need not line up with the row's own)."""
    _, batch_trace = decode_traced(model, prefix, config, mask)
    P = prefix.shape[1]
    gaps = []
    for row, n in enumerate(lengths):
        _, alone_trace = decode_traced(model, prefix[row:row + 1, P - n:], config)
        gaps.append(row_logit_gap(batch_trace[:1], row, alone_trace[:1], model.chunk_len, model.block_size))
    return max(gaps)


@pytest.mark.parametrize("method", ["fast_dvla", "vanilla"])
def test_visible_padding_is_caught(monkeypatch, method):
    model = tiny_model(51, sharpness=SHARP)
    prefix, mask, lengths = left_padded_batch(model, BATCH, 51)
    config = DecodeConfig(method=method, tau_conf=0.3)
    assert first_forward_gap(model, prefix, mask, lengths, config) < FLOAT32_NOISE
    built = []

    def blind(*shape, **padding):
        built.append(PaddingBlindLayout(*shape, **padding))
        return built[-1]

    monkeypatch.setattr(common, "AttentionLayout", blind)  # every forward's layout, in WindowForward
    assert first_forward_gap(model, prefix, mask, lengths, config) > 1e-3
    assert built and all(layout.pad_lens is None for layout in built)


def test_unshifted_positions_are_caught(monkeypatch):
    """Each row at the batch's slot positions (its real tokens starting at its padding length, not 0)."""
    model = tiny_model(52, sharpness=SHARP, model_class=AbsolutePositionDVLA)
    prefix, mask, lengths = left_padded_batch(model, BATCH, 52)
    config = DecodeConfig(method="fast_dvla", tau_conf=0.3)
    assert first_forward_gap(model, prefix, mask, lengths, config) < FLOAT32_NOISE
    monkeypatch.setattr(common.WindowForward, "positions", lambda self, start, end: torch.arange(start, end))
    assert first_forward_gap(model, prefix, mask, lengths, config) > 1e-3


# -- the mask, the layout and the rest of the contract ------------------------------------------
def test_no_padding_decodes_exactly_as_without_a_mask():
    """An all-True prefix_mask is no mask: the same path, bit for bit."""
    model = tiny_model(61, sharpness=SHARP)
    prefix = random_prefix(model, 3, 61)
    config = DecodeConfig(method="fast_dvla", tau_conf=0.3)
    plain, trace_p = decode_traced(model, prefix, config)
    masked, trace_m = decode_traced(model, prefix, config, torch.ones(prefix.shape[:2], dtype=torch.bool))
    assert torch.equal(plain.tokens, masked.tokens)
    assert all(torch.equal(a["logits"], b["logits"]) for a, b in zip(trace_p, trace_m))


def test_padding_may_hold_anything():
    """NaN in padding slots is ignored (decode zeroes them); NaN in a real token is refused."""
    model = tiny_model(62, sharpness=SHARP)
    junk, mask, _ = left_padded_batch(model, 3, 62)
    nan, _, _ = left_padded_batch(model, 3, 62, padding=float("nan"))
    assert nan.isnan().any()
    config = DecodeConfig(method="fast_dvla", tau_conf=0.3)
    assert torch.equal(decode(model, nan, config, prefix_mask=mask).tokens,
                       decode(model, junk, config, prefix_mask=mask).tokens)
    nan[0, -1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf at a real token"):
        decode(model, nan, config, prefix_mask=mask)


def test_bad_prefix_masks_are_refused_by_name():
    model = tiny_model(63)
    prefix, mask, _ = left_padded_batch(model, 3, 63)
    with pytest.raises(ValueError, match="prefix_mask must have the prefix's batch and length"):
        decode(model, prefix, prefix_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="prefix_mask must have the prefix's batch and length"):
        decode(model, prefix, prefix_mask=mask[:2])
    with pytest.raises(TypeError, match="prefix_mask must be a boolean tensor"):
        decode(model, prefix, prefix_mask=mask.long())
    with pytest.raises(TypeError, match="prefix_mask must be a boolean tensor"):
        decode(model, prefix, prefix_mask="all")
    with pytest.raises(ValueError, match=r"prefix_mask rows \[1\] are not left-padded"):
        decode(model, prefix, prefix_mask=torch.stack([mask[0], mask[1].flip(0), mask[2]]))  # right-padded
    holes = mask.clone()
    holes[0, 3] = False
    with pytest.raises(ValueError, match=r"prefix_mask rows \[0\] are not left-padded"):
        decode(model, prefix, prefix_mask=holes)
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"prefix_mask rows \[2\] have no real token"):
        decode(model, prefix, prefix_mask=empty)
    # array-likes are taken as the tensor they make
    assert decode(model, prefix, prefix_mask=mask.tolist()).tokens.shape == (3, model.chunk_len)


def test_padding_adds_no_host_read_per_step():
    """Static shapes keep one host read per step (the stopping test) in a padded batch: the mask is read
    once, before the decode (a copy to the host only if it lives on a GPU), masks and positions are
    built on the device."""
    from fast_dvla.benchmark.syncs import HostSyncCounter

    model = tiny_model(65, sharpness=SHARP)
    prefix, mask, _ = left_padded_batch(model, 3, 65)
    for method, fixed in (("fast_dvla", 3), ("vanilla_cached", 2)):
        with HostSyncCounter() as syncs:
            result = decode(model, prefix, DecodeConfig(method=method, tau_conf=0.3, static_shapes=True),
                            prefix_mask=mask)
        per_step = 1 if method == "fast_dvla" else 0  # as test_static_shapes.test_host_reads_per_chunk
        assert syncs.total == per_step * result.stats.nfe + fixed, (method, syncs.by_op)


def test_a_model_without_padding_support_refuses_padded_rows():
    """Its backbone_forward may take [Q] positions only and ignore pad_lens: decoding a padded batch
    with it would be silently wrong. An unpadded mask is fine."""
    model = ScriptedModel(torch.full((2, 14), 0.9), torch.zeros(2, 14), 7)
    prefix = scripted_prefix(2, 3)
    assert not model.supports_padding
    with pytest.raises(ValueError, match="prefix_mask pads rows, but ScriptedModel does not support padded"):
        decode(model, prefix, prefix_mask=torch.tensor([[False, True, True], [True, True, True]]))
    decode(model, prefix, prefix_mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("kind", [BLOCK_CAUSAL, BIDIRECTIONAL])
def test_padded_layout_forms_agree(kind):
    """Dense, additive and FlexAttention forms of a padded layout: padding keys hidden from every
    query, each padding query sees only itself, the rest is the unpadded rule; memoised."""
    P, k, L, pad_lens = 5, 3, 9, (0, 2, 4)
    for q_start, q_len in ((0, P + L), (P + k, 2 * k)):
        layout = AttentionLayout(P, k, q_start, q_len, q_start + q_len, kind, pad_lens=pad_lens)
        rule = AttentionLayout(P, k, q_start, q_len, q_start + q_len, kind).dense_mask()[0, 0]
        dense = layout.dense_mask()
        assert dense.shape == (3, 1, q_len, q_start + q_len) and layout.dense_mask() is dense
        for b, pad in enumerate(pad_lens):
            for i, q in enumerate(range(q_start, q_start + q_len)):
                expected = torch.arange(q_start + q_len) == q if q < pad else rule[i] & (
                        torch.arange(q_start + q_len) >= pad)
                assert torch.equal(dense[b, 0, i], expected), (b, q)
            mod = layout.flex_block_mask().mask_mod
            keys = torch.arange(q_start + q_len)
            got = torch.stack([mod(torch.tensor(b), 0, i, keys) for i in torch.arange(q_len)])
            assert torch.equal(got, dense[b, 0])
        assert dense.any(-1).all()  # no query sees nothing: no NaN anywhere
        assert torch.equal(layout.additive_mask(torch.float16), to_additive(dense, torch.float16))
        assert layout.pad_lens_tensor().tolist() == list(pad_lens)


def test_pad_lens_are_validated():
    with pytest.raises(ValueError, match="pad_lens"):
        AttentionLayout(4, 2, 0, 8, 8, pad_lens=(0, 4))  # a row with no real prefix token
    with pytest.raises(ValueError, match="pad_lens"):
        AttentionLayout(4, 2, 0, 8, 8, pad_lens=(-1,))
    with pytest.raises(ValueError, match="pad_lens"):
        AttentionLayout(4, 2, 0, 8, 8, pad_lens=())
    with pytest.raises(TypeError, match="pad_lens must be a tuple of ints"):
        AttentionLayout(4, 2, 0, 8, 8, pad_lens=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="pad_lens must be a tuple of ints"):
        AttentionLayout(4, 2, 0, 8, 8, pad_lens=(0.5,))
    assert AttentionLayout(4, 2, 0, 8, 8, pad_lens=[0, 3]).pad_lens == (0, 3)  # hashable: memoised masks
    with pytest.raises(ValueError, match="no pad_lens"):
        AttentionLayout(4, 2, 0, 8, 8).pad_lens_tensor()


def test_padding_queries_stay_finite():
    """A padding slot's query sees only its own key: its hidden state is finite (never NaN) and,
    like every padding slot, never reaches a real token."""
    model = tiny_model(64, sharpness=SHARP)
    prefix, mask, _ = left_padded_batch(model, 3, 64, padding=0.0)
    P = prefix.shape[1]
    pad_lens = tuple((~mask).sum(1).tolist())
    fwd = common.WindowForward(model, prefix, None, pad_lens=pad_lens)
    hidden = model.backbone_forward(prefix, fwd.positions(0, P), fwd.layout(0, P, P, BLOCK_CAUSAL), None)
    assert torch.isfinite(hidden).all()
    assert fwd.positions(0, P).tolist() == [[max(p - pad, 0) for p in range(P)] for pad in pad_lens]
