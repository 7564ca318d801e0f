"""A reduced Dream-VLA: the published architecture's layout at a size that trains on a CPU, written
as a checkpoint in Dream-VLA's published format (github.com/DreamLM/Dream-VLX, ``vla/``).

    python scripts/dream_vla_reduced.py --data data/libero_object_heldout_35_37 --eval-init-states 37 \
        --split runs/dream_vla_reduced/data --out runs/dream_vla_reduced/checkpoint

``--split DIR`` first divides ``--data`` by LIBERO initial state into ``DIR/train`` and ``DIR/eval``
(``--eval-init-states``; symbolic links to the episode files, each with its ``dataset.json``), and
the statistics are then the training part's.

Layout as Dream-VLA (``fast_dvla/benchmark/sizing.py``'s ``DREAM_VLA``, from its published
``config.json``), sizes reduced:

============================  ==========================  ===========================
part                          Dream-VLA                   this checkpoint
============================  ==========================  ===========================
decoder (Qwen2, q/k/v bias)   28 layers, hidden 3584      2 layers, hidden 448
attention heads (GQA)         28 query / 4 key-value      7 query / 1 key-value (7:1)
head dim                      128                         64
MLP (SwiGLU)                  18944 (5.29 x hidden)       2368 (5.29 x hidden)
vocabulary, untied lm_head    152,064                     152,064 (the same ids)
ViT (Qwen2-VL)                32 blocks, width 1280,      2 blocks, width 160,
                              16 heads of 80, merger      2 heads of 80, merger
                              to 3584                     to 448
projector, proprio projector  3584 -> 3584, 8 -> 3584     448 -> 448, 8 -> 448
============================  ==========================  ===========================

The tokenizer files, special and action ids, prompt, preprocessor settings and tensor names are the
tiny golden checkpoint's (``scripts/goldens/dream_vla_tiny.py``: the real ids, a byte-level
vocabulary without merges). The weights are random (one seeded generator, the tiny checkpoint's
draw order and scales, ``lm_head`` rows smaller so that the action logits start near unit scale);
``dataset_statistics.json`` holds the q01/q99 statistics of ``--data``'s actions and proprio states
(of its training part with ``--split``) under the data directory's name, as OpenVLA computes them
(action mask: every dimension but the gripper, the last).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "goldens"))
import dream_vla_tiny  # noqa: E402

SEED = 20261206
REDUCED = dream_vla_tiny.Dims(
    hidden=448, inter=2368, layers=2, heads=7, kv_heads=1,
    vision=dict(depth=2, embed_dim=160, hidden_size=448, hidden_act="quick_gelu", mlp_ratio=4, num_heads=2,
                in_chans=3, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2),
    proprio_dim=8, head_std=0.005)


def data_statistics(root: str, key: str | None = None) -> dict:
    """OpenVLA-style ``dataset_statistics.json`` of an episodes directory, under ``key`` (default: its name)."""
    from fast_dvla.data import list_episodes, read_dataset_info, read_episode

    info = read_dataset_info(root)
    episodes = [read_episode(p, info) for p in list_episodes(root)]
    actions = np.concatenate([e["action"] for e in episodes]).astype(np.float64)
    states = np.concatenate([e["state"] for e in episodes]).astype(np.float64)

    def stats(x, mask=None):
        out = {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(),
               "min": x.min(0).tolist(), "q01": np.quantile(x, 0.01, axis=0).tolist(),
               "q99": np.quantile(x, 0.99, axis=0).tolist()}
        if mask is not None:
            out["mask"] = mask
        return out

    dim = actions.shape[1]
    return {key or os.path.basename(os.path.normpath(root)): {
        "action": stats(actions, [True] * (dim - 1) + [False]), "proprio": stats(states),
        "num_transitions": int(len(actions)), "num_trajectories": len(episodes)}}


def split_by_init_state(root: str, out: str, eval_init_states: set[int]) -> tuple[str, str]:
    """``out/train`` and ``out/eval``: the episodes of ``root`` whose ``init_state_id`` is not / is in
    ``eval_init_states``, as symbolic links, each directory with ``root``'s ``dataset.json`` (its
    episode count corrected)."""
    from fast_dvla.data import list_episodes, read_dataset_info, write_dataset_info

    info = read_dataset_info(root)
    parts = {"train": [], "eval": []}
    for path in list_episodes(root):
        with np.load(path, allow_pickle=False) as z:
            if "init_state_id" not in z.files:
                raise ValueError(f"{path}: no init_state_id to split by")
            part = "eval" if int(z["init_state_id"]) in eval_init_states else "train"
        parts[part].append(path)
    dirs = []
    for part, paths in parts.items():
        if not paths:
            raise ValueError(f"{root}: no episodes for the {part} part (eval initial states "
                             f"{sorted(eval_init_states)})")
        d = os.path.join(out, part)
        os.makedirs(d, exist_ok=True)
        extra = {k: v for k, v in info.items() if k not in ("format", "version", "cameras", "image_size", "state_dim",
                                                             "action_dim", "fps", "episodes")}
        write_dataset_info(d, info["cameras"], info["image_size"], info["state_dim"], info["action_dim"],
                           info.get("fps", 20), episodes=len(paths), **extra,
                           split_of=os.path.abspath(root), split=part)
        for p in paths:
            link = os.path.join(d, os.path.basename(p))
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.abspath(p), link)
        dirs.append(d)
    return dirs[0], dirs[1]


def write(out_dir, data: str, dims: dream_vla_tiny.Dims = REDUCED, seed: int = SEED, key: str | None = None) -> Path:
    return dream_vla_tiny.write(out_dir, dims=dims, seed=seed, dataset_statistics=data_statistics(data, key))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="episodes directory whose statistics the checkpoint holds")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--split", help="divide --data into SPLIT/train and SPLIT/eval first (statistics: train's)")
    parser.add_argument("--eval-init-states", default="37", help="with --split: initial states held out, e.g. 37 "
                        "or 36,37")
    parser.add_argument("--layers", type=int, default=REDUCED.layers)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    dims = REDUCED._replace(layers=args.layers)
    data = args.data
    if args.split:
        held = {int(x) for x in args.eval_init_states.split(",")}
        data, held_dir = split_by_init_state(args.data, args.split, held)
        print(f"train episodes in {data}, eval episodes in {held_dir}")
    print(write(args.out, data, dims, args.seed, key=os.path.basename(os.path.normpath(args.data))))


if __name__ == "__main__":
    main()
