"""Golden outputs of Dream-VLA's own sampler on the tiny checkpoint, for tests/test_adapter_dream_vla.py.

Runs the ORIGINAL code from a checkout of github.com/DreamLM/Dream-VLX (not part of this
repository, not run in CI) on the checkpoint ``scripts/goldens/dream_vla_tiny.py`` writes, and
stores the generated token ids in ``tests/golden/dream_vla_tiny.json``::

    python3 -m venv /tmp/venv_dream
    /tmp/venv_dream/bin/pip install torch==2.13.0 transformers==4.51.3 safetensors numpy pillow
    PYTHONPATH=. /tmp/venv_dream/bin/python scripts/goldens/dream_vla_golden.py \\
        --dream-vlx /path/to/Dream-VLX --commit $(git -C /path/to/Dream-VLX rev-parse HEAD)

What runs, as the LIBERO evaluation (``vla/experiments/robot/libero/run_libero_eval_dream.py``)
calls it with ``--use_discrete_diffusion True``: ``DreamVLAForActionPrediction.from_pretrained``,
a ``DreamVLProcessor`` (the repository's image processor, and ``DreamTokenizer`` from
``vl/train/dreamvl/tokenization_dream.py``, the tokenizer class Dream-VL checkpoints name) on the
conversation the evaluation builds, then ``diffusion_generate`` exactly as ``predict_action``
calls it (``max_new_tokens = 8 * 7 + 2``, ``alg="maskgit_plus"``, ``temperature=0``,
``alg_temp=0``, ``eps=1e-3``, ``eos_penalty=0``) and ``predict_action`` itself for the actions.
The step count: the evaluation's default ``steps=1``, plus 8 and 32 for multi-step schedules.

Differences from the evaluation, all on the caller's side of the model: CPU, float32 weights and
pixels (it casts to bfloat16 on a GPU), ``sdpa`` attention (it asks for flash-attention-2), a
boolean attention mask (CPU SDPA rejects the processor's integer mask), 224 px images given
directly (its TensorFlow centre crop and JPEG round trip run before the processor), and a
proprio already normalised (its ``normalize_proprio`` needs the TensorFlow-importing utils).
One observation per call, as the evaluation does.
"""
import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dream_vla_tiny  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "tests" / "golden" / "dream_vla_tiny.json"
STEPS = (1, 8, 32)
CASE_SEED = 7
# equal lengths in bytes, so that the rows batch in fast-dvla (no left padding yet)
INSTRUCTIONS = ("put both the alphabet soup and the tomato sauce in the basket",
                "turn on the stove and put the moka pot on it, then wait there",
                "pick up the black book and place it in the back of the basket")


def cases():
    """The fixed inputs: seeded 224 px images (third-person + wrist), a normalised proprio state;
    the last case has no proprio token."""
    assert len({len(s) for s in INSTRUCTIONS}) == 1
    gen = torch.Generator().manual_seed(CASE_SEED)
    out = []
    for i, text in enumerate(INSTRUCTIONS + INSTRUCTIONS[:1]):
        images = torch.randint(0, 256, (2, 224, 224, 3), generator=gen, dtype=torch.uint8).numpy()
        proprio = (torch.rand(8, generator=gen) * 2 - 1).tolist()
        out.append({"name": f"case{i}", "instruction": text, "image_seed_index": i,
                    "images": images, "proprio": None if i == len(INSTRUCTIONS) else proprio})
    return out


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dream-vlx", required=True, type=Path, help="checkout of DreamLM/Dream-VLX")
    parser.add_argument("--commit", required=True, help="its commit")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    sys.path.insert(0, str(args.dream_vlx / "vla"))
    from PIL import Image
    from dreamvla.configuration_dreamvl import DreamVLAConfig
    from dreamvla.image_processing_dreamvl import DreamVLImageProcessor
    from dreamvla.modeling_dreamvl import DreamVLAForActionPrediction
    from dreamvla.processing_dreamvl import DreamVLProcessor
    tokenization = load_module("tokenization_dream", args.dream_vlx / "vl/train/dreamvl/tokenization_dream.py")
    projectors = load_module("dream_projectors", args.dream_vlx / "vla/prismatic/models/projectors.py")

    torch.manual_seed(0)
    ckpt = dream_vla_tiny.write(Path(tempfile.mkdtemp()) / "dream_vla_tiny")
    tokenizer = tokenization.DreamTokenizer.from_pretrained(str(ckpt))
    image_processor = DreamVLImageProcessor.from_pretrained(str(ckpt))
    processor = DreamVLProcessor(image_processor, tokenizer, chat_template=dream_vla_tiny.CHAT_TEMPLATE)

    cfg = DreamVLAConfig.from_pretrained(str(ckpt), n_action_bins=256, norm_stats={})
    cfg._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    model = DreamVLAForActionPrediction.from_pretrained(str(ckpt), config=cfg, torch_dtype=torch.float32)
    model.norm_stats = json.loads((ckpt / "dataset_statistics.json").read_text())
    model.eval()
    proprio_projector = projectors.ProprioProjector(llm_dim=cfg.hidden_size, proprio_dim=8)
    proprio_projector.load_state_dict(torch.load(ckpt / "proprio_projector--0_checkpoint.pt", weights_only=True))
    proprio_projector.eval()
    vocab_size = len(processor.tokenizer)
    first_action = vocab_size - 256

    results = []
    for case in cases():
        imgs = [Image.fromarray(im).convert("RGB") for im in case["images"]]
        conversation = [{"role": "user", "content": [{"type": "image"}] * len(imgs) + [
            {"type": "text", "text": f"What action should the robot take to {case['instruction']}?"}]}]
        text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=imgs, padding=True, return_tensors="pt")
        pixel_values = inputs.pop("pixel_values").to(torch.float32)
        attention_mask = inputs.pop("attention_mask").bool()
        proprio = None if case["proprio"] is None else torch.tensor(case["proprio"], dtype=torch.float32)[None]
        projector = None if proprio is None else proprio_projector
        entry = {"name": case["name"], "instruction": case["instruction"], "proprio": case["proprio"],
                 "input_ids": inputs["input_ids"][0].tolist(), "image_grid_thw": inputs["image_grid_thw"].tolist(),
                 "runs": []}
        for steps in STEPS:
            gen_args = dict(temperature=0.0, top_p=None, top_k=None, eps=1e-3, steps=steps, alg="maskgit_plus",
                            alg_temp=0, eos_penalty=0)
            with torch.no_grad():
                out = model.diffusion_generate(
                    inputs["input_ids"], attention_mask=attention_mask, return_dict_in_generate=True,
                    output_history=True, max_new_tokens=8 * 7 + 2, pixel_values=pixel_values,
                    image_grid_thw=inputs["image_grid_thw"], proprio=proprio, proprio_projector=projector, **gen_args)
                actions = model.predict_action(
                    inputs["input_ids"], attention_mask=attention_mask, pixel_values=pixel_values,
                    image_grid_thw=inputs["image_grid_thw"], unnorm_key=dream_vla_tiny.UNNORM_KEY, action_chunk=8,
                    vocab_size=vocab_size, proprio=proprio, proprio_projector=projector, use_discrete_diffusion=True,
                    **gen_args)
            prompt_len = inputs["input_ids"].shape[1]
            generated = out.sequences[0, prompt_len:]
            order, previous = [], torch.full_like(generated, cfg.mask_token_id)
            for x in out.history:
                now = x[0, prompt_len:]
                newly = (previous == cfg.mask_token_id) & (now != cfg.mask_token_id)
                order.append(newly.nonzero().flatten().tolist())
                previous = now
            ids = generated.tolist()
            entry["runs"].append({
                "steps": steps, "generated_ids": ids, "commit_order": order,
                "all_actions_in_action_range": all(first_action <= t < vocab_size for t in ids[:56]),
                "actions": np.asarray(actions).tolist()})
        results.append(entry)
        print(entry["name"], [(r["steps"], r["all_actions_in_action_range"]) for r in entry["runs"]])

    golden = {
        "source": "github.com/DreamLM/Dream-VLX", "commit": args.commit,
        "produced_by": "scripts/goldens/dream_vla_golden.py on scripts/goldens/dream_vla_tiny.py's checkpoint",
        "environment": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                        "device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"},
        "sampler": {"alg": "maskgit_plus", "temperature": 0.0, "alg_temp": 0, "eps": 1e-3, "eos_penalty": 0,
                    "max_new_tokens": 58},
        "case_seed": CASE_SEED, "len_tokenizer": vocab_size, "mask_token_id": cfg.mask_token_id,
        "cases": results,
    }
    args.out.write_text(json.dumps(golden, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
