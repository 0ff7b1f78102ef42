"""Batched text generation against transformers' generate: greedy per row, stop tokens, seeded sampling."""

import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

from ospo_fast.engine.sampling import counter_uniform, filter_logits
from ospo_fast.engine.text_gen import (
    TextSampling,
    chat_inputs,
    generate_text,
    generate_text_ids,
    stop_check_interval,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Write a short prompt about a red car and a blue bench"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You write prompts."}, {"role": "user", "content": "a cat on the table"}],
]
NEW = 10


@pytest.fixture(scope="module")
def bundle():
    """A private tiny model with an untied, sharper LM head, so greedy text is not one repeated token."""
    from ospo_fast.models import load_janus

    bundle = load_janus("builtin:tiny", device="cpu")
    head = bundle.model.lm_head
    generator = torch.Generator().manual_seed(0)
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=generator) * 0.5)
    return bundle


def _transformers_greedy(bundle, conversation, max_new_tokens, eos=None):
    ids, mask = chat_inputs(bundle, [conversation])
    kwargs = {} if eos is None else {"eos_token_id": eos}
    out = bundle.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def greedy_rows(bundle):
    return generate_text_ids(bundle, CONVERSATIONS, TextSampling(temperature=0.0, max_new_tokens=NEW), [0, 1, 2])


def test_greedy_rows_equal_transformers_generate_each_alone(bundle, greedy_rows):
    ids, mask = chat_inputs(bundle, CONVERSATIONS)
    assert len(set(mask.sum(1).tolist())) == 3  # mixed lengths: rows are left-padded together
    for conv, row in zip(CONVERSATIONS, greedy_rows):
        assert row == _transformers_greedy(bundle, conv, NEW)
    assert any(len(set(row)) > 1 for row in greedy_rows)


def test_a_row_stops_at_its_stop_token_and_the_others_go_on(bundle, greedy_rows):
    row = greedy_rows[1]
    first_new = [j for j in range(1, len(row)) if row[j] not in row[:j]]
    assert first_new, f"row {row} repeats one token; the test needs a token that first occurs later"
    j = first_new[0]
    stop = row[j]
    config = TextSampling(temperature=0.0, max_new_tokens=NEW, stop_token_ids=[stop])
    rows = generate_text_ids(bundle, CONVERSATIONS, config, [0, 1, 2])
    assert rows[1] == row[:j]
    for got, full in zip(rows, greedy_rows):
        expected = full[:full.index(stop)] if stop in full else full
        assert got == expected
    reference = _transformers_greedy(bundle, CONVERSATIONS[1], NEW, eos=stop)
    assert reference[-1] == stop and rows[1] == reference[:-1]


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (20, 1.0)])
def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(bundle, top_k, top_p):
    config = TextSampling(temperature=1.0, top_k=top_k, top_p=top_p, max_new_tokens=6)
    batch = generate_text_ids(bundle, CONVERSATIONS, config, [5, 6, 5])
    alone = generate_text_ids(bundle, CONVERSATIONS[1:2], config, [6])
    assert alone[0] == batch[1] and len(batch[1]) == 6
    assert batch[0] != generate_text_ids(bundle, CONVERSATIONS[:1], config, [9])[0]


class _HostSyncs(TorchDispatchMode):
    """Counts host synchronisations, ``count``: aten._local_scalar_dense, every tensor -> Python scalar (bool(t),
    t.item()); and ``hash_builds``: aranges of ``vocab`` entries (the sampler's ``entry_keys`` built again)."""

    def __init__(self, vocab: int = 0):
        super().__init__()
        self.vocab = vocab
        self.count = self.hash_builds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        elif func.overloadpacket is torch.ops.aten.arange and out.numel() == self.vocab:
            self.hash_builds += 1
        return out


class _HostData(TorchFunctionMode):
    """Counts tensors made from Python data (torch.tensor / as_tensor / asarray of a non-tensor, e.g. the step as
    an int): on CUDA each is a host-to-device copy from pageable memory, which waits for the stream. Writing a
    Python scalar into a slice is not one (CUDA fills it with the scalar as a kernel argument)."""

    MAKERS = (torch.tensor, torch.as_tensor, torch.asarray)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.MAKERS and args and not isinstance(args[0], torch.Tensor):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("every", [1, 4])
def test_the_host_syncs_once_per_stop_check_and_the_rows_do_not_change(bundle, greedy_rows, every):
    """Stop checks every `every` tokens (CUDA's default is 16): one host sync each, no other per token (the 4-D
    mask is built here, so transformers' mask code does not check it on the host); the rows stay the same."""
    stop = greedy_rows[1][3]  # a token that stops row 1 early, mid-interval
    config = TextSampling(temperature=0.0, max_new_tokens=NEW, stop_token_ids=[stop], stop_check_every=every)
    with _HostSyncs() as syncs:
        rows = generate_text_ids(bundle, CONVERSATIONS, config, [0, 1, 2])
    assert syncs.count <= NEW // every
    expected = generate_text_ids(bundle, CONVERSATIONS, dataclasses.replace(config, stop_check_every=1), [0, 1, 2])
    assert rows == expected and rows[1] == greedy_rows[1][:greedy_rows[1].index(stop)]
    assert stop_check_interval("cpu") == 1 and stop_check_interval("cuda") == 16


def test_seeded_decoding_keeps_its_step_and_hash_on_the_device(bundle):
    """Issue #33: the step was a Python int (a host-to-device copy per token) and the 102,400-entry hash was built
    per token. Per token, measured as the difference between 16 and 8 tokens: no tensor from host data, no hash
    build, one host sync per stop check (here every 8 tokens); the hash is built once per call. The code before
    counted 1 tensor from host data and 1 hash build per token here."""
    vocab = bundle.model.lm_head.weight.shape[0]
    counts = {}
    for new in (8, 16):
        config = TextSampling(temperature=1.0, top_p=0.9, max_new_tokens=new, stop_check_every=8,
                              stop_token_ids=[vocab])  # out of the vocabulary: no row stops, every token is decoded
        with _HostSyncs(vocab) as syncs, _HostData() as host_data:
            rows = generate_text_ids(bundle, CONVERSATIONS, config, [0, 1, 2])
        assert [len(r) for r in rows] == [new] * 3
        counts[new] = (syncs.count, host_data.count, syncs.hash_builds)
    assert counts[8][2] == counts[16][2] == 1  # one hash build per call
    assert counts[16][1] == counts[8][1]  # no host data per token
    assert counts[16][0] - counts[8][0] == 1  # the one extra stop check


class _CounterGumbel(LogitsProcessor):
    """The sampler's draw as a transformers logits processor, step as a Python int and the hash built per call
    (the old text loop's path): filtered logits / T + Gumbel noise of (seed, step, entry); greedy search over
    these scores then takes argmax, the seeded draw."""

    def __init__(self, seed: int, prompt_len: int, config: TextSampling):
        self.seed, self.prompt_len, self.config = torch.tensor([seed]), prompt_len, config

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        scaled = filter_logits(scores.float() / self.config.temperature, self.config.top_k, self.config.top_p)
        return scaled - torch.log(-torch.log(counter_uniform(self.seed, step, scores.shape[-1])))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.8)])
def test_seeded_rows_equal_transformers_generate_with_the_counter_noise(bundle, greedy_rows, temperature, top_k,
                                                                         top_p):
    """Same seeds, same tokens: each row alone through transformers' generate, its scores drawn with the
    sampler's counter noise at a Python-int step (the path before the device-side step), against the batched
    loop with its device step and once-built hash (a stop check every 16 tokens, CUDA's interval)."""
    config = TextSampling(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=NEW,
                          stop_check_every=16)
    seeds = [11, 12, 13]
    rows = generate_text_ids(bundle, CONVERSATIONS, config, seeds)
    eos = bundle.tokenizer.eos_token_id
    for conv, seed, row in zip(CONVERSATIONS, seeds, rows):
        ids, mask = chat_inputs(bundle, [conv])
        noise = LogitsProcessorList([_CounterGumbel(seed, ids.shape[1], config)])
        # GenerationMixin's generate: Janus's own drops logits_processor in text mode (it passes guidance_scale=None)
        out = GenerationMixin.generate(bundle.model, ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                                       logits_processor=noise, eos_token_id=eos, guidance_scale=None)
        reference = out[0, ids.shape[1]:].tolist()
        assert row == (reference[:reference.index(eos)] if eos in reference else reference)
    assert len({tuple(r) for r in rows}) == 3 and rows != greedy_rows  # the noise drew other tokens


def test_generate_text_decodes_without_special_tokens(bundle):
    texts = generate_text(bundle, CONVERSATIONS[:2], TextSampling(temperature=0.0, max_new_tokens=4), [0, 0])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert all(bundle.tokenizer.eos_token not in t for t in texts)


def test_bad_arguments_raise_clear_errors(bundle):
    with pytest.raises(ValueError, match="seeds"):
        generate_text(bundle, CONVERSATIONS, TextSampling(), [0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(bundle, CONVERSATIONS[:1], TextSampling(max_new_tokens=0), [0])
    with pytest.raises(ValueError, match="conversations is empty"):
        generate_text(bundle, [], TextSampling(), [])
