"""Property tests: answer extraction never fails on any text; losses stay finite on anything."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egspo.losses import CEGPPOLoss, EGSPOLoss, ESPOLoss, PPOClipLoss, TokenBatch
from egspo.losses.aggregation import AGG_MODES
from egspo.rewards.extraction import (
    after_hash_marker,
    extract_answer,
    has_final_marker,
    last_boxed,
    last_number,
)
from egspo.rewards.numeric import canonical_number, canonical_text, exact_number, has_spaced_digits
from egspo.rewards.units import letter_case_differs, split_answer

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text built from the pieces extraction looks for.
TOKENS = [*"0123456789 .,-+/^{}()\\$#:=\n~", "\\boxed{", "\\frac", "####", "answer is", "x", "X"]
TOKENS += ["\\text{", " cm", " feet", " thousand", "\\%", "^\\circ", "\\overline{", "\\,", "\\ ", "\\fbox{"]
MATHY = st.lists(st.sampled_from(TOKENS), max_size=120).map("".join)


@FAST
@given(text=st.one_of(MATHY, st.text(max_size=300)))
def test_extraction_is_total_and_returns_substrings_or_none(text):
    answer, source = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    assert isinstance(source, str)
    for fn in (last_boxed, after_hash_marker, last_number):
        out = fn(text)
        assert out is None or isinstance(out, str)
    assert isinstance(has_final_marker(text), bool)
    assert isinstance(canonical_text(text), str)
    number = canonical_number(text)
    assert number is None or (isinstance(number[0], str) and isinstance(number[1], bool))
    parts = split_answer(text)
    assert isinstance(parts.core, str) and isinstance(parts.words, str)
    assert parts.unit is None or isinstance(parts.unit, str)
    if parts.words:  # a word that is not a unit: never a plain number
        assert exact_number(text) is None
    assert isinstance(has_spaced_digits(text), bool) and isinstance(letter_case_differs(text, "x"), bool)


PLAIN = st.text(alphabet="0123456789+-x ", min_size=1, max_size=12).filter(lambda t: t.strip())


@FAST
@given(before=PLAIN, inner=PLAIN, after=PLAIN, earlier=PLAIN, depth=st.integers(1, 3))
def test_the_outermost_last_box_is_read_whole(before, inner, after, earlier, depth):
    nested = inner
    for _ in range(depth):
        nested = rf"\boxed{{{nested}}}"
    text = rf"\boxed{{{earlier}}} then \boxed{{{before} {nested} {after}}} end"
    expected = f"{before} {'{' * depth}{inner}{'}' * depth} {after}".strip()
    assert last_boxed(text) == expected
    assert extract_answer(text) == (expected, "boxed")
    # cut off anywhere inside the outer box: no answer, never the inner box or an earlier one
    cut = text[: text.rindex("end") - 2]
    assert last_boxed(cut) is None


@FAST
@given(digits=st.text(alphabet="0123456789", min_size=2, max_size=9), data=st.data())
def test_digits_split_by_spaces_are_not_one_number(digits, data):
    cut = data.draw(st.integers(1, len(digits) - 1))
    gap = data.draw(st.sampled_from([" ", "\\ ", "~", "\\;", "  "]))
    split = digits[:cut] + gap + digits[cut:]
    assert has_spaced_digits(split)
    assert exact_number(split) is None and canonical_number(split) is None
    assert canonical_text(split) != canonical_text(digits)


def _losses():
    return [
        PPOClipLoss(),
        PPOClipLoss(dual_clip=3.0, loss_agg_mode="seq-mean-token-sum-norm", norm_constant=8.0),
        EGSPOLoss(),
        CEGPPOLoss(),
        ESPOLoss(vocab_size=50),
        *[PPOClipLoss(loss_agg_mode=mode) for mode in AGG_MODES if mode != "seq-mean-token-sum-norm"],
    ]


@st.composite
def token_batches(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 80.0]))  # 80: exp(ratio) overflows float32
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) < draw(st.floats(0.0, 1.0))).float()
    old = -torch.rand(b, t, generator=g) * 20
    new = old + (torch.rand(b, t, generator=g) * 2 - 1) * scale
    advantages = (torch.randn(b, 1, generator=g) * draw(st.sampled_from([0.0, 1.0, 1e3]))).expand(b, t)
    entropy = torch.rand(b, t, generator=g) * 4
    garbage = draw(st.booleans())
    if garbage:  # anything at masked positions must not leak into the loss
        new = torch.where(mask > 0, new, torch.full_like(new, 1e4))
        old = torch.where(mask > 0, old, torch.full_like(old, float("nan")))
        entropy = torch.where(mask > 0, entropy, torch.full_like(entropy, float("inf")))
    return new, old, advantages.contiguous(), entropy, mask


@FAST
@given(data=token_batches())
def test_losses_are_finite_with_finite_gradients_and_none_on_padding(data):
    new, old, advantages, entropy, mask = data
    for loss_fn in _losses():
        logprobs = new.clone().requires_grad_(True)
        threshold = loss_fn.prepare(entropy[mask > 0])
        batch = TokenBatch(
            logprobs=logprobs,
            old_logprobs=old,
            advantages=advantages,
            entropy=entropy,
            mask=mask,
            entropy_threshold=threshold,
        )
        out = loss_fn(batch)
        assert out.loss.dim() == 0
        assert torch.isfinite(out.loss), type(loss_fn).__name__
        out.loss.backward()
        grad = logprobs.grad if logprobs.grad is not None else torch.zeros_like(logprobs)
        assert torch.isfinite(grad).all(), type(loss_fn).__name__
        assert torch.all(grad[mask == 0] == 0), type(loss_fn).__name__
        for name, value in out.metrics.items():
            assert not value.requires_grad, name


@pytest.mark.parametrize("loss_fn", _losses(), ids=lambda loss: type(loss).__name__)
def test_all_masked_batch_gives_zero_finite_loss(loss_fn):
    logprobs = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    out = loss_fn(
        TokenBatch(
            logprobs=logprobs,
            old_logprobs=torch.zeros(2, 3),
            advantages=torch.ones(2, 3),
            entropy=torch.ones(2, 3),
            mask=mask,
            entropy_threshold=loss_fn.prepare(torch.ones(0)),
        )
    )
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert logprobs.grad is None or torch.all(logprobs.grad == 0)
