"""End to end with a real tokenizer: the delimiter comes from tokenizing ``</think>``, the batch from
tokenizing reasoning traces. Two tiny vocabularies: one where ``</think>`` is one (added) token,
one where the pre-tokenizer splits it into three (``</``, ``think``, ``>``), so the word "think"
inside the reasoning is a partial match the search must skip."""

from __future__ import annotations

import pytest
import torch

import lenkernels as lk
from tests.utils import STAT_RTOL, assert_close, backend_params

tokenizers = pytest.importorskip("tokenizers")

BACKENDS = backend_params("phase_stats")

WORDS = [
    "let",
    "me",
    "think",
    "about",
    "it",
    "two",
    "plus",
    "two",
    "is",
    "four",
    "so",
    "the",
    "answer",
    "yes",
    "no",
    "maybe",
    "wait",
    "check",
    "again",
    "<",
    "</",
    ">",
    "?",
]

# (prompt, response): the response is what the policy generated and the mask covers
TRACES = [
    ("what is two plus two ?", "<think> let me think about it two plus two is four </think> the answer is four"),
    ("is it four ?", "</think> yes"),  # empty thinking phase
    ("check it", "<think> let me check again so the answer is four </think>"),  # empty answer phase
    ("two plus two ?", "<think> let me think maybe four wait let me check"),  # truncated: no delimiter
    ("again ?", "<think> no </think> maybe </think> yes four"),  # repeated: the first one counts
    ("four ?", "<think> let me think about it </"),  # cut inside the delimiter: no complete occurrence
]


def build_tokenizer(delimiter_is_one_token: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "think": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "</think>" into "</", "think", ">"
    if delimiter_is_one_token:
        tok.add_special_tokens(["<think>", "</think>"])  # matched whole, before pre-tokenization
    return tok


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def expected_split(tok, response, delim_ids):
    """(found, think token count, answer token count) from the text itself."""
    if "</think>" not in response:
        return False, len(encode(tok, response)), 0
    think_text, answer_text = response.split("</think>", 1)
    n_think = len(encode(tok, think_text))
    assert encode(tok, response)[n_think : n_think + len(delim_ids)] == delim_ids
    return True, n_think, len(encode(tok, answer_text))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("one_token", [True, False], ids=["one_token_delimiter", "three_token_delimiter"])
@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_phase_entropy_from_tokenized_text(backend, device, one_token, layout):
    tok = build_tokenizer(one_token)
    delim = encode(tok, "</think>")
    assert len(delim) == (1 if one_token else 3)
    assert (tok.token_to_id("think") in delim) == (not one_token)
    responses = [encode(tok, r) for _, r in TRACES]
    prompts = [encode(tok, p) for p, _ in TRACES]
    pad = tok.token_to_id("[PAD]")
    if layout == "packed":  # prompt + response per sequence; the mask covers responses only
        ids = [t for p, r in zip(prompts, responses) for t in p + r]
        mask = [m for p, r in zip(prompts, responses) for m in [0] * len(p) + [1] * len(r)]
        lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
    else:
        T = max(map(len, responses)) + 2
        rows, masks = [], []
        for r in responses:
            fill = [pad] * (T - len(r))
            rows.append(r + fill if layout == "right" else fill + r)
            masks.append([1] * len(r) + [0] * len(fill) if layout == "right" else [0] * len(fill) + [1] * len(r))
        ids, mask, cu = torch.tensor(rows), torch.tensor(masks), None
    entropy = torch.rand(ids.shape) * 3
    dev = lambda t: None if t is None else t.to(device)
    pe = lk.phase_entropy(dev(entropy), dev(ids), dev(mask), delimiter=delim, cu_seqlens=dev(cu), backend=backend)

    for b, (_, response) in enumerate(TRACES):
        found, n_think, n_answer = expected_split(tok, response, delim)
        assert bool(pe.found[b]) == found, response
        assert (int(pe.think_count[b]), int(pe.answer_count[b])) == (n_think, n_answer), response
        # the response's entropies, in order, and where they sit in the layout
        if layout == "packed":
            start = int(cu[b]) + len(prompts[b])
            offset0 = len(prompts[b])  # delimiter_pos counts from the packed sequence's start
        else:
            start = b * ids.shape[1] + (0 if layout == "right" else ids.shape[1] - len(responses[b]))
            offset0 = start - b * ids.shape[1]  # the column of the first response token
        ent = entropy.reshape(-1)[start : start + len(responses[b])].double()
        think = ent[:n_think]
        answer = ent[n_think + len(delim) :] if found else ent[:0]
        seq_len = ids.shape[1] if cu is None else int(cu[b + 1] - cu[b])
        assert int(pe.delimiter_pos[b]) == (offset0 + n_think if found else seq_len), response
        want_think = think.mean() if n_think else torch.zeros((), dtype=torch.float64)
        want_answer = answer.mean() if n_answer else torch.zeros((), dtype=torch.float64)
        assert_close(pe.think_mean[b], want_think, rtol=STAT_RTOL, scale=3.0, name=f"think_mean[{b}]")
        assert_close(pe.answer_mean[b], want_answer, rtol=STAT_RTOL, scale=3.0, name=f"answer_mean[{b}]")

    # the same split from the logits, in one pass over them: V is the tokenizer's vocabulary
    vocab = tok.get_vocab_size()
    logits = torch.randn(*ids.shape, vocab)
    fused = lk.token_stats_with_phases(dev(logits), dev(ids), dev(mask), delimiter=delim, cu_seqlens=dev(cu),
                                       backend=backend)  # fmt: skip
    again = lk.phase_entropy(fused.entropy, dev(ids), dev(mask), delimiter=delim, cu_seqlens=dev(cu), backend=backend)
    for a, b in zip(fused.entropy_phases, again):
        assert torch.equal(a, b)
    assert torch.equal(fused.logprob_phases.think_count, pe.think_count)
