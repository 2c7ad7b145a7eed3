from __future__ import annotations

import math

import pytest
import torch

from eldric_p2p.engine.sampling import Sampler, SamplingParams
from eldric_p2p.errors import InvalidInput

OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}


def _logits(seed: int = 0, n: int = 500) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 3  # [V]


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 300) -> list[int]:
    s = Sampler(params)
    return [s.sample(logits, []) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    for seed in range(5):
        logits = _logits(seed)
        assert Sampler(SamplingParams.greedy()).sample(logits, []) == int(torch.argmax(logits))
    assert Sampler(SamplingParams.greedy()).sample(torch.tensor([0.0, 2.0, 1.0], dtype=torch.bfloat16)) == 1


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    logits = _logits(1)
    p = SamplingParams(temperature=1.5, seed=42, **OFF)
    assert _draws(p, logits, 50) == _draws(p, logits, 50)
    assert _draws(p, logits, 50) != _draws(SamplingParams(temperature=1.5, seed=43, **OFF), logits, 50)


def test_top_k_restricts_support() -> None:
    logits = _logits(2)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    drawn = set(_draws(SamplingParams(temperature=5.0, seed=0, **{**OFF, "top_k": 5}), logits))
    assert drawn <= top5 and len(drawn) > 1


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    drawn = set(_draws(SamplingParams(temperature=1.0, seed=0, **{**OFF, "top_p": 0.75}), logits))
    assert drawn == {0, 1}
    assert set(_draws(SamplingParams(temperature=1.0, seed=0, **{**OFF, "top_p": 0.1}), logits)) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))
    drawn = set(_draws(SamplingParams(temperature=1.0, seed=0, **{**OFF, "min_p": 0.4}), logits))
    assert drawn == {0, 1, 2}


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([2.0, 1.9, -1.0, -1.05])
    plain = Sampler(SamplingParams.greedy())
    penal = Sampler(SamplingParams.greedy(repetition_penalty=1.3))
    assert plain.sample(logits, [0]) == 0
    assert penal.sample(logits, [0]) == 1  # 2.0 / 1.3 < 1.9
    # a negative logit is multiplied, pushing a repeated token further down
    assert penal.sample(torch.tensor([-1.0, -1.05]), [0]) == 1
    # only the last repeat_last_n tokens count
    assert Sampler(SamplingParams.greedy(repetition_penalty=1.3, repeat_last_n=1)).sample(logits, [0, 3]) == 0
    with pytest.raises(InvalidInput):
        penal.sample(logits, [7])


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"temperature": "hot"},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": 1.0},
        {"repetition_penalty": 0.0},
        {"seed": -1},
        {"seed": True},
        {"max_tokens": 0},
        {"stop": [""]},
        {"stop": ["x"] * 17},
    ],
)
def test_invalid_params(bad: dict) -> None:
    with pytest.raises(InvalidInput):
        SamplingParams(**bad)
    with pytest.raises(InvalidInput):
        SamplingParams.from_dict(bad)


def test_json_round_trip_and_hostile_json() -> None:
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.1, repetition_penalty=1.1, seed=7,
                       max_tokens=33, stop=("###", "\n\n"))  # fmt: skip
    assert SamplingParams.from_json(p.to_json()) == p
    assert SamplingParams.from_dict({"stop": "END"}).stop == ("END",)
    for text in ("[1, 2]", "{not json", '{"temperature": 1, "evil": 1}', '{"stop": 5}', "x" * 70_000):
        with pytest.raises(InvalidInput):
            SamplingParams.from_json(text)


def test_bad_logits_shape() -> None:
    with pytest.raises(InvalidInput):
        Sampler(SamplingParams.greedy()).sample(torch.zeros(2, 3), [])
