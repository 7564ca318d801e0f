import numpy as np
import pytest

from fast_dvla.tokenizer import ActionTokenizer, InstructionTokenizer


def test_round_trip_within_half_a_bin(tmp_path):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.8, 0.8, size=(500, 7))
    actions[:, 6] = np.where(rng.random(500) > 0.5, 1.0, -1.0)
    tok = ActionTokenizer.fit(actions, gripper_dims=(6,))
    tokens = tok.encode(actions)
    assert tokens.dtype == np.int64 and tokens.min() >= 0 and tokens.max() < 256
    assert set(np.unique(tokens[:, 6])) <= {0, 255}
    back = tok.decode(tokens)
    inside = np.all((actions >= tok.q01) & (actions <= tok.q99), axis=1)
    bin_width = (tok.q99 - tok.q01) / 256
    assert np.all(np.abs(back - actions)[inside, :6] <= bin_width[:6] / 2 + 1e-9)
    assert np.array_equal(back[:, 6], actions[:, 6])
    tok.save(tmp_path / "stats.json")
    again = ActionTokenizer.load(tmp_path / "stats.json")
    assert np.array_equal(again.encode(actions), tokens)


def test_outliers_clip_to_edge_bins():
    tok = ActionTokenizer(np.zeros(2), np.ones(2))
    assert tok.encode(np.array([[-5.0, 9.0]])).tolist() == [[0, 255]]


def test_bad_input_errors():
    tok = ActionTokenizer(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="last dim 3"):
        tok.encode(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(np.array([[0.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="MASK"):
        tok.decode(np.array([[0, 256, 1]]))
    with pytest.raises(ValueError, match="q99 < q01"):
        ActionTokenizer(np.ones(2), np.zeros(2))
    with pytest.raises(ValueError, match="zero actions"):
        ActionTokenizer.fit(np.zeros((0, 3)))


def test_instruction_tokenizer_is_deterministic_and_padded():
    t = InstructionTokenizer(vocab_size=64, max_len=6)
    ids = t.encode("Pick up the Soup, and place it")
    assert len(ids) == 6 and all(0 < i < 64 for i in ids)
    assert t.encode("pick up") == t.encode("PICK  up!")
    assert t.encode("pick")[1:] == [0] * 5
    with pytest.raises(TypeError):
        t.encode(3)
