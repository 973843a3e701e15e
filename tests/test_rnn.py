import pytest
import torch

from models.rnn import ARCHS, LM_ARCHS, ModelConfig, build, generate


def tiny(task, arch, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(task, arch, vocab_size=30, num_labels=3 if task == "classifier" else 0,
                      embed_dim=8, hidden_size=12, num_layers=kw.pop("num_layers", 1 if arch == "elman" else 2),
                      dropout=0.3, **kw)
    return build(cfg).eval()


def random_batch(batch_size=9, max_len=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch_size,), generator=g)
    lengths[0], lengths[1] = 1, max_len  # the extremes, always
    ids = torch.zeros(batch_size, max_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, 30, (int(n),), generator=g)
    return ids, lengths


@pytest.mark.parametrize("arch", list(ARCHS))
def test_classifier_batched_equals_one_by_one(arch):
    model = tiny("classifier", arch)
    ids, lengths = random_batch()
    with torch.no_grad():
        batched = model(ids, lengths)
        alone = torch.cat([model(ids[i:i + 1, :n], lengths[i:i + 1]) for i, n in enumerate(lengths)])
        extra_padding = model(torch.cat([ids, torch.zeros(len(ids), 11, dtype=torch.long)], 1), lengths)
    assert batched.shape == (9, 3)
    assert (batched - alone).abs().max() < 1e-5
    assert (batched - extra_padding).abs().max() < 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_classifier_ignores_what_stands_in_the_padding(arch):
    model = tiny("classifier", arch)
    ids, lengths = random_batch()
    garbage = ids.clone()
    for i, n in enumerate(lengths):
        garbage[i, n:] = 7
    with torch.no_grad():
        assert (model(ids, lengths) - model(garbage, lengths)).abs().max() < 1e-5


def test_bidirectional_backward_direction_starts_at_the_last_real_token():
    model = tiny("classifier", "bilstm", num_layers=1)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        _, (h, _) = model.rnn(model.embed(ids))  # unpacked, no padding: the reference
        expected = model.head(h.transpose(0, 1).reshape(1, -1))
        padded = model(torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([3]))
    assert (expected - padded).abs().max() < 1e-6


def test_elman_is_the_tutorials_cell_written_out():
    model = tiny("classifier", "elman")
    ids, lengths = random_batch(batch_size=4)
    rnn = model.rnn
    i2h_weight = torch.cat([rnn.weight_ih_l0, rnn.weight_hh_l0], dim=1)  # i2h over [x_t, h_{t-1}]
    with torch.no_grad():
        for row, n in zip(ids, lengths):
            hidden = torch.zeros(12)
            for t in range(int(n)):
                combined = torch.cat([model.embed(row[t]), hidden])
                output = torch.log_softmax(model.i2o(combined), dim=-1)
                hidden = torch.tanh(i2h_weight @ combined + rnn.bias_ih_l0 + rnn.bias_hh_l0)
            got = model(row[None, :n], n[None])[0]
            assert (got - output).abs().max() < 1e-5


@pytest.mark.parametrize("arch", LM_ARCHS)
def test_lm_stepwise_with_carried_state_equals_whole_sequence(arch):
    model = tiny("lm", arch)
    ids, lengths = random_batch(batch_size=5)
    with torch.no_grad():
        whole, final = model(ids, lengths)
        for i, n in enumerate(lengths):
            state = None
            for t in range(int(n)):
                step, state = model(ids[i:i + 1, t:t + 1], torch.tensor([1]), state)
                assert (step[0, 0] - whole[i, t]).abs().max() < 1e-5
            for s_step, s_whole in zip(state, final):  # the returned state is at the last real token
                assert (s_step[:, 0] - s_whole[:, i]).abs().max() < 1e-5


def test_lm_state_layout():
    state = tiny("lm", "lstm").initial_state(4)
    assert len(state) == 2 and state[0].shape == (2, 4, 12)
    assert len(tiny("lm", "gru").initial_state(4)) == 1


def test_greedy_generation_is_the_argmax_chain_and_sampling_follows_the_seed():
    model = tiny("lm", "gru")
    out = generate(model, [3, 4, 5], 10, temperature=0)
    ids = [3, 4, 5]
    with torch.no_grad():
        for _ in range(10):
            logits, _ = model(torch.tensor([ids]), torch.tensor([len(ids)]))
            ids.append(int(logits[0, -1].argmax()))
    assert out == ids[3:]
    sample = lambda seed: generate(model, [3], 20, 1.0, top_k=5, generator=torch.Generator().manual_seed(seed))
    assert sample(1) == sample(1) and sample(1) != sample(2)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="no lm arch"):
        ModelConfig("lm", "bilstm", vocab_size=10)
    with pytest.raises(ValueError, match="one layer"):
        ModelConfig("classifier", "elman", vocab_size=10, num_labels=2, num_layers=2)
