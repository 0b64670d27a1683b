import torch

from egspo.rollout import Experience
from egspo.rollout.experience import pack_rows


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
    for mb in exp.minibatches(len(exp) // 2, generator=torch.Generator().manual_seed(0)):
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
    (mb,) = list(exp.minibatches(1))
    assert mb is exp


def test_rows_beyond_a_multiple_are_spread_over_the_minibatches():
    exp = _experience(n=6)
    batches = list(exp.minibatches(4, generator=torch.Generator().manual_seed(0)))
    assert sorted(len(mb) for mb in batches) == [1, 1, 2, 2]
    rows = sorted(r for mb in batches for r in (mb.input_ids[:, 0] // exp.input_ids.shape[1]).tolist())
    assert rows == list(range(6))


def test_pack_rows_respects_the_budget_and_covers_every_row_once():
    lengths = torch.tensor([7, 3, 9, 2, 2, 5, 8, 1])
    groups = pack_rows(lengths, 10)
    rows = sorted(int(r) for g in groups for r in g)
    assert rows == list(range(8))
    assert all(int(lengths[g].sum()) <= 10 for g in groups)
    assert len(groups) == 4  # 37 tokens need at least 4 bins of 10
    # a row over the budget gets a micro-batch of its own
    assert [g.tolist() for g in pack_rows(torch.tensor([12, 3]), 10)] == [[0], [1]]


def test_microbatches_split_rows_and_keep_them_aligned():
    exp = _experience(n=8, prompt=3, completion=5)
    parts = exp.microbatches(max_tokens=16)
    assert sum(len(p) for p in parts) == len(exp)
    assert all(int(p.attention_mask.sum()) <= 16 for p in parts)
    seen = sorted(int(r) for p in parts for r in p.input_ids[:, 0] // exp.input_ids.shape[1])
    assert seen == list(range(8))
    assert exp.microbatches(None) == [exp]


def test_excluded_rows_carry_no_loss_but_stay_in_the_batch():
    exp = _experience(n=4)
    exp.excluded = torch.tensor([False, True, False, True])
    assert exp.loss_mask[1].sum() == 0 and exp.loss_mask[3].sum() == 0
    torch.testing.assert_close(exp.loss_mask[0], exp.completion_mask[0])
    assert len(exp.select(torch.tensor([0, 1]))) == 2
