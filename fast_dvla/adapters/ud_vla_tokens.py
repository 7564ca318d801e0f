"""UD-VLA's token side: the Emu3 prompt, and FAST action tokens back to actions.

Reproduces, without the original code or ``tiktoken``:

* :class:`Emu3TextTokenizer`: ``Emu3Tokenizer`` (``reference/Emu3/emu3/mllm/tokenization_emu3.py``)
  as the CALVIN evaluation calls it: NFC-normalised text, every special token's surface form
  encoded as that token (``allowed_special="all"``), the rest split by Qwen's pattern and
  byte-pair merged by rank from ``emu3.tiktoken`` (tiktoken's rule: a piece that is itself a token
  is one token; otherwise the lowest-ranked adjacent pair merges first, leftmost on ties). Special
  ids start at 151643: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>`` ..
  ``<|extra_204|>``, then the lines of ``emu3_vision_tokens.txt``.
* :func:`prompt_ids`: the prompt of ``EmuVLAModel_i_ia_dis.step`` (``window_size=1``): the text
  ``<|extra_203|>`` (bos) + instruction, and the ``VLA_Video`` frame prompt of
  ``Emu3Processor.video_process``, per frame ``<|image start|>1*{h}*{w}<|image token|>``, the
  visual tokens (id ``151854 + code``, row-major, no end-of-line tokens in video prompts),
  ``<|extra_201|><|image end|>``; third-person frame, gripper frame, then ``<|extra_198|>``
  (``<boa>``).
* :class:`FastActions`: the wrapper's post-processing of the generated ids: keep up to the first
  ``<eoa>``, take the tokens after ``<boa>``, FAST id ``151642 - id``, ``UniversalActionProcessor
  .decode`` (BPE decode with the ``tokenizers`` library, characters -> DCT codes ``ord(c) +
  min_token``, truncated or zero-padded to ``horizon * action_dim``, inverse orthonormal DCT over
  time divided by ``scale``; undecodable ids give zeros, as there), the CALVIN ABCD bounds'
  un-normalisation and the gripper's sign.
"""
from __future__ import annotations

import base64
import json
import unicodedata
from pathlib import Path

import numpy as np
import torch

# Emu3's special ids (fixed by the tokenizer's SPECIAL_START_ID = 151643; the original hard-codes them)
PAD_ID = 151643
BOA_ID, EOA_ID, EOL_ID, EOF_ID, MASK_ID, BOS_ID = 151844, 151845, 151846, 151847, 151848, 151849
IMG_ID, BOI_ID, EOI_ID, BOV_ID = 151851, 151852, 151853, 151854
FAST_LAST_ID = PAD_ID - 1          # FAST id f is token 151642 - f
SPECIAL_START = 151643
TOKENIZER_FILES = ("emu3.tiktoken", "emu3_vision_tokens.txt")
ACTION_TOKENIZER_FILES = ("processor_config.json", "tokenizer.json")
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# the CALVIN ABCD bounds EmuVLAModel.unnormalize_action hard-codes (its checkpoint's training split)
CALVIN_ABCD_LOW = (-0.69960000006996, -0.57760000005776, -0.4336000000433601, -0.42320000004232006,
                   -0.46520000004652007, -1.0000000001, -1.0000000001)
CALVIN_ABCD_HIGH = (0.67640000006764, 0.5560000000555998, 0.5944000000594398, 0.42640000004264,
                    0.41200000004119985, 0.9996000000999599, 0.9996000000999599)


def require_files(directory: Path, names, what: str) -> None:
    """Raise ``FileNotFoundError`` naming the first of ``names`` missing from ``directory``."""
    for name in names:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{what}: {name} not found in {directory}")


class Emu3TextTokenizer:
    """The Emu3 tokenizer's encoding (see the module docstring), from a folder holding
    ``emu3.tiktoken`` and ``emu3_vision_tokens.txt``."""

    def __init__(self, path):
        import regex

        path = Path(path)
        require_files(path, TOKENIZER_FILES, "the Emu3 tokenizer")
        self.ranks = {}
        for line in (path / "emu3.tiktoken").read_bytes().splitlines():
            if line:
                token, rank = line.split()
                self.ranks[base64.b64decode(token)] = int(rank)
        if sorted(self.ranks.values()) != list(range(SPECIAL_START)):
            raise ValueError(f"{path / 'emu3.tiktoken'}: expected ranks 0..{SPECIAL_START - 1}, each once")
        vision = [t.strip() for t in (path / "emu3_vision_tokens.txt").read_text().splitlines() if t.strip()]
        names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)] + vision
        self.special = {name: SPECIAL_START + i for i, name in enumerate(names)}
        self.pattern = regex.compile(PAT_STR)
        self.special_pattern = regex.compile(r"<\|[^|]+\|>")

    def __len__(self) -> int:
        return SPECIAL_START + len(self.special)

    def encode(self, text: str) -> list[int]:
        """``text`` -> ids, special tokens' surface forms included (as ``Emu3Tokenizer(text)``)."""
        text = unicodedata.normalize("NFC", text)
        ids, start, pos = [], 0, 0
        while (match := self.special_pattern.search(text, pos)) is not None:
            if match.group() not in self.special:  # not a token: it may still hold one from its next character
                pos = match.start() + 1
                continue
            ids += self.encode_ordinary(text[start:match.start()])
            ids.append(self.special[match.group()])
            start = pos = match.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            piece = piece.encode()
            ids += [self.ranks[piece]] if piece in self.ranks else self.byte_pair_merge(piece)
        return ids

    def byte_pair_merge(self, piece: bytes) -> list[int]:
        """tiktoken's merge: the adjacent pair whose concatenation has the lowest rank, leftmost first."""
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            ranked = [(self.ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            ranked = [(rank, i) for rank, i in ranked if rank is not None]
            if not ranked:
                break
            _, i = min(ranked)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[p] for p in parts]


def frame_ids(tokenizer: Emu3TextTokenizer, codes) -> list[int]:
    """One frame of VQ codes ``[h, w]`` as ``format_video_prompt`` writes it (one frame, no end-of-line)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"VQ codes must be an integer grid [h, w], got {codes.dtype} {codes.shape}")
    h, w = codes.shape
    return ([BOI_ID] + tokenizer.encode(f"1*{h}*{w}") + [IMG_ID] + [BOV_ID + int(c) for c in codes.reshape(-1)]
            + [EOF_ID, EOI_ID])


def prompt_ids(tokenizer: Emu3TextTokenizer, instruction: str, static_codes, gripper_codes=None
               ) -> tuple[list[int], list[int]]:
    """(text ids, frame ids): ``<bos>`` + instruction, and the third-person frame, the gripper frame
    (if given) and ``<boa>``, as ``EmuVLAModel_i_ia_dis.step`` builds them."""
    frames = frame_ids(tokenizer, static_codes)
    if gripper_codes is not None:
        frames += frame_ids(tokenizer, gripper_codes)
    return [BOS_ID] + tokenizer.encode(instruction), frames + [BOA_ID]


def idct_ortho(coefficients: np.ndarray) -> np.ndarray:
    """``scipy.fft.idct(x, axis=0, norm="ortho")`` (the orthonormal DCT-III) with numpy."""
    n = coefficients.shape[0]
    k, t = np.meshgrid(np.arange(n), np.arange(n))
    basis = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * t + 1) * k / (2 * n))
    basis[:, 0] = np.sqrt(1.0 / n)
    return basis @ coefficients


class FastActions:
    """FAST action tokens -> actions, as the CALVIN wrapper turns its generated ids into an action
    chunk (see the module docstring); ``path`` is a FAST processor folder (``processor_config.json``,
    ``tokenizer.json``)."""

    def __init__(self, path, horizon: int = 10, action_dim: int = 7, low=CALVIN_ABCD_LOW, high=CALVIN_ABCD_HIGH):
        from tokenizers import Tokenizer

        path = Path(path)
        require_files(path, ACTION_TOKENIZER_FILES, "the FAST action tokenizer")
        settings = json.loads((path / "processor_config.json").read_text())
        self.scale, self.vocab_size = settings["scale"], settings["vocab_size"]
        self.min_token = settings["min_token"]
        self.bpe = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.horizon, self.action_dim = horizon, action_dim
        self.low, self.high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        if self.low.shape != (action_dim,) or self.high.shape != (action_dim,):
            raise ValueError(f"action bounds must have {action_dim} entries each")

    def action_token_ids(self) -> list[int]:
        """The ids the sampler allows at action positions, in FAST-id order (``<eoa>`` last)."""
        return [FAST_LAST_ID - f for f in range(self.vocab_size + 1)] + [EOA_ID]

    def decode(self, fast_ids) -> np.ndarray:
        """``UniversalActionProcessor.decode`` of one sequence: ``[horizon, action_dim]`` float64."""
        n = self.horizon * self.action_dim
        try:
            text = self.bpe.decode([int(i) for i in fast_ids], skip_special_tokens=False)
        except (OverflowError, TypeError, ValueError):  # ids the BPE cannot take: the original's zeros
            codes = np.zeros(n)
        else:
            codes = np.array([ord(c) for c in text], dtype=np.int64) + self.min_token
            codes = codes[:n] if len(codes) > n else np.pad(codes, (0, n - len(codes)))
        return idct_ortho(codes.reshape(-1, self.action_dim) / self.scale)

    def action_tokens(self, generated) -> list[int]:
        """The ids between ``<boa>`` and the first ``<eoa>`` (or the end) of a generated region."""
        ids = [int(i) for i in generated]
        if EOA_ID in ids:
            ids = ids[:ids.index(EOA_ID) + 1]
        start = ids.index(BOA_ID) + 1
        return ids[start:-1] if ids[-1] == EOA_ID else ids[start:]

    def to_actions(self, generated) -> np.ndarray:
        """One generated region (ids, ``<boa>`` and the action tokens in it) -> ``[horizon, action_dim]``
        float32 actions: decoded, un-normalised from [-1, 1], the gripper set to +-1."""
        fast = [FAST_LAST_ID - i for i in self.action_tokens(generated)]
        action = torch.from_numpy(self.decode(fast))
        low, high = torch.from_numpy(self.low), torch.from_numpy(self.high)
        action = 0.5 * (action + 1) * (high - low) + low
        action[..., -1] = torch.where(action[..., -1] > 0, 1, -1)
        return action.to(torch.float32).numpy()
