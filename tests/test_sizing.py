"""fast_dvla.benchmark.sizing: the formulas of docs/sizing.md against the things they describe:
a measured LoRA distillation step, transformers' own modules, the cache's buffers, the decoders'
own counts, the reference student's measured numbers, and the committed result file."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import ScriptedModel
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

from fast_dvla import DecodeConfig, decode
from fast_dvla.benchmark import sizing as sz
from fast_dvla.decoding import max_nfe
from fast_dvla.model import ModelConfig, ReferenceDVLA

ROOT = Path(__file__).resolve().parents[1]
# the measured step: the shipped student's widths (hidden 256, 4/2 heads, MLP 768), two layers
REDUCED = dict(num_layers=2, block_size=14)


def load_script():
    spec = importlib.util.spec_from_file_location("sizing_table", ROOT / "scripts/sizing_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the check against a measured distillation step -------------------------------------------------------
@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
@pytest.mark.parametrize("act_dtype,lora_dtype", [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")])
@pytest.mark.parametrize("rank,batch", [(32, 2), (8, 3)])
def test_one_distillation_step_saves_what_the_formula_says(backbone, act_dtype, lora_dtype, rank, batch):
    """One real step of the project's distillation (add_lora, StageLoss's asymmetric loss, AdamW):
    the bytes autograd saves for backward (saved_tensors_hooks, one count per storage, parameters
    left out), the adapter's size, its gradients and AdamW moments, against the formulas.

    Tolerance 1%. Today they agree to the byte: the formula was written op by op from what
    lean_forward, peft's LoRA layer, PyTorch's CPU SDPA kernel and the loss save. A difference
    means one of them saves something else after an upgrade (e.g. SDPA saving a repeated K/V or a
    differently laid-out output, peft casting differently, RMSNorm no longer upcasting); the
    formula, and docs/sizing.md, must follow it. Things the hooks cannot see are not part of
    either side: the allocator's slack, a backward's transient buffers."""
    cfg = ModelConfig(**REDUCED, backbone=backbone)
    measured = sz.measure_distillation_step(cfg, rank, batch, act_dtype, lora_dtype)
    predicted = sz.predicted_distillation_step(cfg, rank, batch, act_dtype, lora_dtype)
    assert measured["finite_loss"]
    for key in ("saved_bytes", "lora_params", "lora_param_bytes", "grad_bytes", "adamw_bytes"):
        assert predicted[key] == pytest.approx(measured[key], rel=0.01), (key, predicted, measured)
    assert measured["lora_params"] == predicted["lora_params"]  # a count: exact


def test_saved_bytes_grow_with_layers_batch_and_sequence_as_the_formula_splits_them():
    """The per-layer, per-sequence and per-forward parts separate: two more layers add exactly
    two layers' worth (per-token set x tokens x batch, plus one mask each)."""
    shape = sz.reference_shape(ModelConfig(**REDUCED))
    a = sz.measure_distillation_step(ModelConfig(**REDUCED), 32, 2)["saved_bytes"]
    b = sz.measure_distillation_step(ModelConfig(**{**REDUCED, "num_layers": 4}), 32, 2)["saved_bytes"]
    cfg = ModelConfig(**REDUCED)
    T = cfg.prefix_len + cfg.chunk_len
    per_token = sum(sz.saved_bytes_per_token_per_layer(shape, 32, 4, 4).values())
    assert b - a == 2 * (2 * T * per_token + T * T * 4)


def test_checkpointing_keeps_layer_inputs_and_recomputes_one_layer():
    shape = sz.PUBLISHED[1].decoder
    full = sz.saved_activation_bytes(shape, 32, 1000, 100, 100 * 256, batch=2)
    ckpt = sz.checkpointed_activation_bytes(shape, 32, 1000, 100, 100 * 256, batch=2)
    assert ckpt["layer_inputs"] == shape.num_layers * 2 * 1000 * shape.hidden_size * 2
    assert ckpt["recompute"] * shape.num_layers == full["layers"] + full["masks"]
    assert sum(ckpt.values()) < sum(full.values())


# -- parameters and cache -----------------------------------------------------------------------------------
def transformers_decoder(shape: sz.DecoderShape):
    config_class, model_class = (Qwen2Config, Qwen2Model) if shape.qkv_bias else (LlamaConfig, LlamaModel)
    config = config_class(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                          intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                          num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                          tie_word_embeddings=False)
    with torch.device("meta"):  # no memory: only the parameters' shapes
        return model_class(config)


@pytest.mark.parametrize("arch", sz.PUBLISHED, ids=lambda a: a.name.split(" ")[0])
def test_published_decoder_params_match_transformers_modules(arch):
    """Dream-7B is a Qwen2 (q/k/v biases), Emu3 and LLaDA Llama-layout (LLaDA's q/k/v, attn_out,
    ff_proj/up_proj/ff_out and two norms per block have the same shapes): the counts of the real
    modules at the published sizes, plus the untied LM head."""
    model = transformers_decoder(arch.decoder)
    head = arch.decoder.vocab_size * arch.decoder.hidden_size
    assert sz.decoder_params(arch.decoder) == sum(p.numel() for p in model.parameters()) + head


def test_reference_decoder_and_lora_params_match_the_built_model():
    model = ReferenceDVLA(ModelConfig(backbone="qwen2"))
    shape = sz.reference_shape(model.config)
    decoder = model.backbone.decoder
    assert sz.decoder_params(shape, lm_head=False) == sum(p.numel() for p in decoder.parameters())
    from fast_dvla.training.lora import add_lora
    assert sz.lora_params(shape, 16) == sum(p.numel() for p in add_lora(model, 16))


def test_dream_vision_params_match_the_adapter_modules():
    from fast_dvla.adapters.dream_vla import DreamProjector, DreamVisionTower, ProprioProjector
    with torch.device("meta"):
        modules = {"vision_tower": DreamVisionTower(sz.DREAM_VISION),
                   "projector": DreamProjector(sz.DREAM_VISION["hidden_size"], 3584, "gelu"),
                   "proprio_projector": ProprioProjector(8, 3584)}
    counted = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    assert sz.qwen2_vl_vision_params(sz.DREAM_VISION, 3584, proprio_dim=8) == counted
    assert sz.DREAM_VLA.other_params == counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_are_the_block_cache_buffers(dtype):
    model = ReferenceDVLA(ModelConfig(num_layers=3)).to(dtype)
    P, L = model.prefix_len, model.chunk_len
    cache = model.new_cache(2, P + L)
    allocated = sum(t.untyped_storage().nbytes() for t in [*cache.keys, *cache.values])
    shape = sz.reference_shape(model.config)
    assert sz.kv_cache_bytes(shape, P + L, dtype_bytes=torch.finfo(dtype).bits // 8, batch=2) == allocated


# -- forwards and query tokens: the decoders' own counts -------------------------------------------------------
SHAPES = [(5, 28, 7), (49, 56, 14), (167, 56, 14), (20, 60, 12)]  # (P, L, k)


def scripted(conf_row: torch.Tensor, k: int) -> ScriptedModel:
    L = conf_row.shape[0]
    return ScriptedModel(conf_row[None], torch.arange(L)[None] % 16, block_size=k)


def run(model: ScriptedModel, P: int, **config):
    stats = decode(model, torch.zeros(1, P, 1), DecodeConfig(**config)).stats
    return stats.nfe, stats.query_tokens


@pytest.mark.parametrize("P,L,k", SHAPES)
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_vanilla_counts_are_exact(P, L, k, steps):
    model = scripted(torch.rand(L, generator=torch.Generator().manual_seed(steps)), k)
    c = sz.vanilla_counts(P, L, steps)
    assert run(model, P, method="vanilla", vanilla_steps=steps) == (c.nfe, c.query_tokens)
    assert sz.vanilla_commits(L, steps) and sum(sz.vanilla_commits(L, steps)) == L


@pytest.mark.parametrize("P,L,k", SHAPES)
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_vanilla_cached_best_and_worst_commit_orders(P, L, k, steps):
    """Confidence falling along the chunk commits left to right (blocks complete, and are cached,
    soonest): the best case; rising, right to left (block 0 completes last): the worst."""
    counts = sz.vanilla_cached_counts(P, L, k, steps)
    falling = scripted(torch.linspace(0.9, 0.1, L), k)
    rising = scripted(torch.linspace(0.1, 0.9, L), k)
    assert run(falling, P, method="vanilla_cached", vanilla_steps=steps) == (counts["best"].nfe,
                                                                           counts["best"].query_tokens)
    assert run(rising, P, method="vanilla_cached", vanilla_steps=steps) == (counts["worst"].nfe,
                                                                          counts["worst"].query_tokens)
    for seed in range(3):  # any order lies between them
        nfe, query = run(scripted(torch.rand(L, generator=torch.Generator().manual_seed(seed)), k), P,
                         method="vanilla_cached", vanilla_steps=steps)
        assert nfe == counts["best"].nfe and counts["best"].query_tokens <= query <= counts["worst"].query_tokens


@pytest.mark.parametrize("P,L,k", SHAPES)
@pytest.mark.parametrize("method", ["block_diffusion", "fast_dvla"])
def test_threshold_decoders_best_case_and_bound(P, L, k, method):
    """A confident model (every token above tau_conf) decodes at the best case exactly; a model
    never confident meets block diffusion's bound exactly and stays within fast_dvla's; random
    confidences fall between. The NFE bound is the engine's max_nfe."""
    fn = sz.block_diffusion_counts if method == "block_diffusion" else sz.fast_dvla_counts
    counts = fn(P, L, k, 2)
    assert counts["bound"].nfe == max_nfe(scripted(torch.ones(L), k), DecodeConfig(method=method))
    assert run(scripted(torch.full((L,), 0.99), k), P, method=method) == (counts["best"].nfe,
                                                                          counts["best"].query_tokens)
    # never confident: every confidence below tau_conf = 0.5, distinct within a block (no ties at the
    # m-th largest, which would commit them all at once)
    never = run(scripted(torch.arange(L) % k * (0.3 / k) + 0.1, k), P, method=method)
    if method == "block_diffusion":
        assert never == (counts["bound"].nfe, counts["bound"].query_tokens)
    else:
        assert never[0] <= counts["bound"].nfe and never[1] <= counts["bound"].query_tokens
    for seed in range(4):
        conf = torch.rand(L, generator=torch.Generator().manual_seed(seed))
        nfe, query = run(scripted(conf, k), P, method=method, tau_conf=0.5)
        assert counts["best"].nfe <= nfe <= counts["bound"].nfe
        assert counts["best"].query_tokens <= query <= counts["bound"].query_tokens
        if method == "block_diffusion":  # its query tokens follow from its forwards
            assert query == sz.block_diffusion_query_tokens(P, L, k, nfe)


def test_rates_at_a_measured_point_reproduce_that_point():
    """Counts 'at f' built from a decode's own rates give back that decode's NFE and query tokens."""
    P, L, k = 49, 56, 14
    conf = torch.rand(L, generator=torch.Generator().manual_seed(7))
    for method, fn in (("block_diffusion", sz.block_diffusion_counts), ("fast_dvla", sz.fast_dvla_counts)):
        nfe, query = run(scripted(conf, k), P, method=method)
        rates = sz.measured_rates(P, L, k, nfe, query)
        kwargs = {"forwards_per_block": rates["forwards_per_block"]}
        if method == "fast_dvla":
            kwargs["window_blocks"] = rates["window_blocks"]
        at = fn(P, L, k, 2, **kwargs)["at_f"]
        assert at.nfe == pytest.approx(nfe) and at.query_tokens == pytest.approx(query)


def test_formulas_agree_with_the_shipped_students_measured_numbers():
    """The reference benchmark's numbers (eval/results/bench_libero_short_cpu.json): block
    diffusion's query tokens follow from its NFE; vanilla_cached and fast_dvla lie within their
    best case and bound."""
    ref = load_script().reference_rates(load_script().STUDENT, load_script().RESULTS)
    c = ref["consistency"]
    assert c["block_diffusion_query_from_nfe"] == pytest.approx(ref["block_diffusion"]["query_tokens"], abs=0.01)
    best, worst = c["vanilla_cached_best_worst"]
    assert ref["vanilla_cached"]["nfe"] == ref["vanilla_cached_steps"]
    assert best <= ref["vanilla_cached"]["query_tokens"] <= worst
    lo, hi = c["fast_dvla_best_bound_nfe"]
    assert lo <= ref["fast_dvla"]["nfe"] <= hi
    lo, hi = c["fast_dvla_best_bound_query"]
    assert lo <= ref["fast_dvla"]["query_tokens"] <= hi


# -- the published architectures and the committed table ------------------------------------------------------
def test_published_sequence_lengths():
    dream, ud, mmada = sz.PUBLISHED
    assert (dream.prefix_len, dream.chunk_len) == (167, 56)
    assert ud.chunk_len == 747 + 70 and ud.prefix_len == 1 + sz.INSTRUCTION_TOKENS + 747
    assert (25 * 25 + 11) + (10 * 10 + 11) == 747  # two VQ frames, 11 marker/shape tokens each
    assert (mmada.prefix_len, mmada.chunk_len) == (387, 295)
    for arch in sz.PUBLISHED:
        assert arch.chunk_len % arch.block_size == 0 and arch.sources


def test_committed_result_is_what_the_script_computes_now():
    """eval/results/sizing_real_models.json holds today's formulas' numbers (re-run
    scripts/sizing_table.py after changing them), and docs/sizing.md its headline."""
    script = load_script()
    committed = json.loads((ROOT / "eval/results/sizing_real_models.json").read_text())
    a = committed["assumptions"]
    ref = script.reference_rates(script.STUDENT, script.RESULTS)
    fresh = [sz.architecture_table(arch, ref, lora_rank=a["lora_rank"], batch=a["batch"], fallback_n=a["fallback_n"],
                                   vanilla_cached_steps=a["vanilla_cached_steps"],
                                   project_vanilla_steps=a["project_vanilla_steps"]) for arch in sz.PUBLISHED]
    assert json.loads(json.dumps(fresh)) == committed["architectures"]
    assert committed["reference"] == json.loads(json.dumps(ref))
    assert all(row["relative_difference"] < 0.01 for row in committed["check"])
    assert script.headline(committed["architectures"]) in (ROOT / "docs/sizing.md").read_text()
    assert script.headline(committed["architectures"]) in (ROOT / "eval/results/sizing_real_models.md").read_text()


def test_script_writes_json_markdown_and_the_docs_block(tmp_path):
    script = load_script()
    docs = tmp_path / "doc.md"
    docs.write_text(f"before\n{script.BEGIN}\nold\n{script.END}\nafter\n")
    script.main(["--out", str(tmp_path / "s"), "--docs", str(docs), "--batch", "2", "--check-batch", "1"])
    payload = json.loads((tmp_path / "s.json").read_text())
    assert [t["architecture"]["name"] for t in payload["architectures"]] == [a.name for a in sz.PUBLISHED]
    assert payload["assumptions"]["batch"] == 2
    text = docs.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert script.headline(payload["architectures"]) in text
    assert "### Dream-VLA" in (tmp_path / "s.md").read_text()
