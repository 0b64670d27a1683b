import torch

from egspo.rollout import Experience, completion_mask_from_eos


def test_completion_mask_stops_after_first_eos_and_flags_truncation():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask_from_eos(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_completion_mask_accepts_several_eos_ids():
    ids = torch.tensor([[5, 3, 7], [4, 4, 1]])
    mask, truncated = completion_mask_from_eos(ids, [1, 3])
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert truncated.tolist() == [False, False]


def _experience(n: int = 8, prompt: int = 3, completion: int = 5) -> Experience:
    lengths = torch.arange(n) % completion + 1
    mask = (torch.arange(completion)[None] < lengths[:, None]).float()
    mask[:, 0] = 1
    return Experience(
        input_ids=torch.arange(n * (prompt + completion)).view(n, -1),
        attention_mask=torch.ones(n, prompt + completion, dtype=torch.long),
        completion_mask=mask,
        old_logprobs=-torch.rand(n, completion),
        entropy=torch.rand(n, completion),
        advantages=torch.randn(n),
        rewards=torch.rand(n),
        truncated=torch.zeros(n, dtype=torch.bool),
        prompt_length=prompt,
    )


def test_minibatches_cover_every_row_once_and_keep_rows_aligned():
    exp = _experience()
    seen = []
    for mb in exp.minibatches(2, generator=torch.Generator().manual_seed(0)):
        assert len(mb) == 2
        rows = (mb.input_ids[:, 0] // exp.input_ids.shape[1]).tolist()
        seen += rows
        for j, r in enumerate(rows):
            assert torch.equal(mb.advantages[j], exp.advantages[r])
            width = mb.completion_mask.shape[1]
            assert torch.equal(mb.old_logprobs[j], exp.old_logprobs[r, :width])
            assert mb.input_ids.shape[1] == exp.prompt_length + width
    assert sorted(seen) == list(range(len(exp)))


def test_minibatch_trims_columns_no_row_uses():
    exp = _experience(n=4, completion=6)
    exp.completion_mask[:, 3:] = 0
    mb = exp.select(torch.arange(4))
    assert mb.completion_mask.shape[1] == 3
    assert mb.input_ids.shape[1] == exp.prompt_length + 3


def test_whole_batch_minibatch_is_the_experience_itself():
    exp = _experience()
    (mb,) = list(exp.minibatches(len(exp)))
    assert mb is exp


def test_minibatch_size_must_divide_batch():
    exp = _experience(n=6)
    try:
        list(exp.minibatches(4))
    except ValueError as err:
        assert "mini_batch_size=4" in str(err)
    else:
        raise AssertionError("expected a ValueError")
