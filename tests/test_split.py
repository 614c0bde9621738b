"""Split learning (survey section 5, Figure 4): SplitFedLoRA (the client keeps the embeddings and the head) and
SplitLoRA (the client keeps the first blocks), the bytes at the cut, and the leakage attacks.

What defines them: the model cut in two computes what the unsplit model computes (output, and the gradient of every
LoRA factor and of the client's head); what crosses the cut is counted at the size of its serialized tensors;
SplitLoRA's clients average their client-side A and B uniformly, SplitFedLoRA's server averages the body's adapter
copies with p_k, which is FedIT's round (the whole run equals FedIT's). The attacks: a cut at depth 0 gives the
tokens away; an update of one example nearly does; the metrics count what they say.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY, tiny_federation

from fedlora_edu import make_strategy
from fedlora_edu.assets.models import add_lora, load_classifier
from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.adapters import tensor_bytes
from fedlora_edu.core.factors import fedit_average
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import Payload, ServerState, Upload
from fedlora_edu.efficiency.split import (
    SplitFederatedLoRA,
    SplitLoRA,
    activation_message,
    block_update_rows,
    cut_activations,
    embedding_dictionary_attack,
    first_layer_dictionary,
    named_share,
    nearest_token_attack,
    recovered_share,
    run_split,
    split_backward,
    split_classifier,
    step_bytes,
    update_attack,
)
from fedlora_edu.foundations.training import BatchSampler, tokenize, trim_batch
from fedlora_edu.registry import METHODS
from fedlora_edu.simulation.federation import cache_frozen_layers

TEXTS = ["the cat sat on the mat", "federated learning with low rank adapters trains a shared model",
         "hi", "split learning sends activations to the server and gets their gradient back"]


@pytest.fixture(scope="module")
def encoder():
    return load_classifier(num_labels=3, seed=0)


def _model(encoder, frozen: int, seed: int = 1):
    base = copy.deepcopy(encoder[0])
    base.frozen_layers = frozen
    model = add_lora(base, rank=4, seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B != 0, so that every factor gets a gradient
        for layer in adapter_io.lora_layers(model).values():
            layer.lora_B[adapter_io.ADAPTER].weight.normal_(0, 0.05, generator=generator)
    return model.eval()


def _batch(encoder, model=None, cached: bool = False):
    data = tokenize(TEXTS, [0, 1, 2, 1], encoder[1], 20)
    if cached:
        data = cache_frozen_layers(split_classifier(model), data)
    return trim_batch(data, torch.device("cpu"))


def _gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("frozen", "cached", "placement", "cut"), [
    (0, False, "head", 0), (0, False, "blocks", 1), (0, False, "blocks", 3), (0, False, "blocks", 5),
    (2, False, "head", 0), (2, True, "head", 0), (2, True, "blocks", 3), (2, True, "blocks", 5),
])
def test_the_split_model_computes_what_the_unsplit_model_computes(encoder, frozen, cached, placement, cut):
    whole, split = _model(encoder, frozen), _model(encoder, frozen)
    batch = _batch(encoder, whole, cached)
    output = whole(**batch)
    output.loss.backward()
    step = split_backward(split_classifier(split), batch, placement, cut)
    expected, found = _gradients(whole), _gradients(split)
    assert set(expected) == set(found) and any(".classifier." in name for name in found)  # the head trains too
    assert torch.allclose(step.logits, output.logits, atol=1e-6)
    assert torch.allclose(step.loss, output.loss.detach(), atol=1e-6)
    for name, gradient in expected.items():
        assert gradient.abs().max() > 0, name  # every factor has a gradient to compare
        assert torch.allclose(found[name], gradient, rtol=1e-5, atol=1e-7), name


def test_the_messages_are_what_crosses_the_cut_and_are_counted_at_their_serialized_size(encoder):
    model = _model(encoder, 0)
    batch = _batch(encoder)
    b, w = batch["input_ids"].shape
    d = split_classifier(model).config.hidden_size
    blocks = split_backward(split_classifier(model), batch, "blocks", 2)
    head = split_backward(split_classifier(model), batch, "head")
    expected = {"blocks": (b * w * d * 4 + 4 * b + 4 * b, b * w * d * 4), "head": (b * w * d * 4 + 4 * b + b * d * 4,
                                                                                   b * d * 4)}
    for name, step in (("blocks", blocks), ("head", head)):
        for messages, counted, formula in ((step.up, step.bytes_up, expected[name][0]),
                                           (step.down, step.bytes_down, expected[name][1])):
            serialized = sum(len(t.contiguous().numpy().tobytes()) for m in messages for t in m.values())
            assert counted == serialized == formula, name
        assert (step.bytes_up, step.bytes_down) == step_bytes(b, w, d, name)
    assert [set(m) for m in blocks.up + blocks.down] == [{"activations", "lengths", "labels"}, {"gradient"}]
    assert [set(m) for m in head.up + head.down] == [{"activations", "lengths"}, {"gradient"}, {"features"}]
    assert "labels" not in head.up[0]  # with the head on the client, the labels never leave it
    message = activation_message(torch.zeros(2, 3, 4, dtype=torch.float64), torch.tensor([[1, 1, 0], [1, 1, 1]]),
                                 torch.tensor([0, 5]))
    assert message["activations"].dtype == torch.float32 and message["lengths"].tolist() == [2, 3]
    assert message["labels"].dtype == torch.int32 and tensor_bytes(message) == 2 * 3 * 4 * 4 + 8 + 8


def _server(adapters):
    return ServerState(adapters=adapters, head={}, scaling=2.0, rank=3)


def test_splitlora_averages_the_client_side_factors_uniformly_and_leaves_the_server_side():
    generator = torch.Generator().manual_seed(0)
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.3.attention.self.query"]
    start = {n: (torch.randn(3, 5, generator=generator), torch.randn(4, 3, generator=generator)) for n in names}
    clients = [{f"{names[0]}.A": torch.randn(3, 5, generator=generator),
                f"{names[0]}.B": torch.randn(4, 3, generator=generator)} for _ in range(3)]
    uploads = [Upload(k, n, Payload(tensors), 3)
               for k, (n, tensors) in enumerate(zip([10, 50, 5], clients, strict=True))]
    server = _server(dict(start))
    SplitLoRA().aggregate(server, uploads, 0)
    for side, key in ((0, "A"), (1, "B")):
        assert torch.allclose(server.adapters[names[0]][side], sum(c[f"{names[0]}.{key}"] for c in clients) / 3)
        assert torch.equal(server.adapters[names[1]][side], start[names[1]][side])  # the server-side layer


def test_splitfedlora_averages_the_server_side_copies_with_p_k_as_fedit():
    generator = torch.Generator().manual_seed(1)
    name = "encoder.layer.2.attention.self.value"
    As = [torch.randn(3, 5, generator=generator) for _ in range(3)]
    Bs = [torch.randn(4, 3, generator=generator) for _ in range(3)]
    sizes = [10, 50, 5]
    uploads = [Upload(k, sizes[k], Payload({f"{name}.A": As[k], f"{name}.B": Bs[k]}), 3) for k in range(3)]
    server = _server({name: (torch.zeros(3, 5), torch.zeros(4, 3))})
    SplitFederatedLoRA().aggregate(server, uploads, 0)
    expected = fedit_average(As, Bs, [n / sum(sizes) for n in sizes])
    assert torch.allclose(server.adapters[name][0], expected[0]) and torch.allclose(server.adapters[name][1],
                                                                                     expected[1])


@pytest.fixture(scope="module")
def two_rounds():
    return tiny_federation("iid", profile=TINY.with_overrides(rounds=2))


def test_splitfedlora_learns_exactly_what_fedit_learns_from_the_same_batches(two_rounds):
    fedit = two_rounds.run(make_strategy("FedIT"), engine="sequential", progress=False, seed=3)
    fedit_server = two_rounds.last_server
    split = run_split(two_rounds, make_strategy("SplitFedLoRA"), seed=3)
    for column in ("accuracy", "test_loss", "train_loss"):
        assert split[column].tolist() == pytest.approx(fedit[column].tolist(), rel=1e-4, abs=1e-5), column
    for name, (a, b) in fedit_server.adapters.items():
        assert torch.allclose(run_split.last_server.adapters[name][0], a, atol=1e-5)
        assert torch.allclose(run_split.last_server.adapters[name][1], b, atol=1e-5)
    # The adapter never crosses the network: the head (it trains here) and the cut's messages do.
    head = tensor_bytes(fedit_server.head)
    assert (split["adapter_bytes_up"] == split["clients"] * head).all()
    assert (split["bytes_up"] == split["cut_bytes_up"] + split["adapter_bytes_up"]).all()
    assert (split["bytes_down"] == split["cut_bytes_down"] + split["adapter_bytes_down"]).all()


def _widths(federation, seed, round_index, client, steps, batch_size):
    sampler = BatchSampler(len(federation.clients[client]), batch_size, derive_seed(seed, "client batches",
                                                                                   round_index, client))
    return [int(federation.clients[client].attention_mask[sampler.next()].sum(dim=1).max()) for _ in range(steps)]


def test_splitlora_counts_the_cut_and_the_client_side_factors_of_every_round(two_rounds):
    p = two_rounds.profile
    history = run_split(two_rounds, SplitLoRA(cut=2), seed=0, evaluate_rounds="last")
    server = run_split.last_server
    d = split_classifier(run_split.last_model).config.hidden_size
    client_side = {n: f for n, f in server.adapters.items() if int(n.split(".layer.")[1].split(".")[0]) < 2}
    factor_bytes = tensor_bytes([t for pair in client_side.values() for t in pair])
    for t, row in history.iterrows():  # every client is sampled (3 of 3), in order
        widths = [w for k in range(3) for w in _widths(two_rounds, 0, t, k, p.local_steps, p.batch_size)]
        activations = sum(p.batch_size * w * d * 4 for w in widths)
        assert row["cut_bytes_up"] == activations + len(widths) * p.batch_size * 8  # lengths and labels, int32
        assert row["cut_bytes_down"] == activations  # the gradient at the cut
        assert row["adapter_bytes_up"] == row["adapter_bytes_down"] == 3 * factor_bytes  # averaged once a round
        assert row["cut_examples"] == len(widths) * p.batch_size
    assert history["accuracy"].isna().tolist() == [True, False]
    start = two_rounds.fresh_model(seed=0)
    moved = {n: not torch.equal(adapter_io.get_lora_factors(start)[n][1], b) for n, (_, b) in server.adapters.items()}
    assert all(moved.values())  # both sides trained


def test_splitlora_checks_its_cut_and_averaging_period(two_rounds):
    with pytest.raises(ValueError, match="cut must"):
        run_split(two_rounds, SplitLoRA(cut=6), rounds=1)
    with pytest.raises(ValueError, match="average_every"):
        run_split(two_rounds, SplitLoRA(cut=1, average_every=4), rounds=1)  # 3 clients x 2 steps = 6
    history = run_split(two_rounds, SplitLoRA(cut=1, average_every=3), rounds=1, evaluate_rounds=False)
    layer_zero = [t for n, pair in run_split.last_server.adapters.items() if ".layer.0." in n for t in pair]
    once = 3 * tensor_bytes(layer_zero)  # the three clients' client-side factors, one way
    # two averages a round: the clients upload twice; they download at the start and after the first average
    # (the second is next round's start)
    assert history["adapter_bytes_up"].iloc[0] == history["adapter_bytes_down"].iloc[0] == 2 * once


def test_split_methods_are_registered_and_refuse_the_simulators_loop(two_rounds):
    assert METHODS["SplitLoRA"] is SplitLoRA and METHODS["SplitFedLoRA"] is SplitFederatedLoRA
    for name in ("SplitLoRA", "SplitFedLoRA"):
        with pytest.raises(TypeError, match="run_split"):
            two_rounds.run(make_strategy(name), rounds=1, progress=False)
    with pytest.raises(TypeError, match="split-learning"):
        run_split(two_rounds, make_strategy("FedIT"))


# ----- leakage ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tweets(encoder):
    from fedlora_edu.assets.data import load_text_classification

    texts = list(load_text_classification("health_tweets", max_examples=24, seed=0)["text"])
    return tokenize(texts, [0] * len(texts), encoder[1], 32)


def test_a_cut_at_depth_zero_gives_the_tokens_away(encoder, tweets):
    classifier = encoder[0]
    special = encoder[1].all_special_ids
    activations, ids, positions = cut_activations(classifier, tweets, [0, 2], exclude=special)
    assert activations[0].shape == (ids.numel(), classifier.config.hidden_size) and ids.numel() > 100
    assert not torch.isin(ids, torch.tensor(special)).any()
    dictionary = first_layer_dictionary(classifier)
    assert recovered_share(embedding_dictionary_attack(dictionary, activations[0], special), ids) >= 0.99
    # a learned inversion recovers every token of the text it learned on, at any depth
    for depth in (0, 2):
        assert recovered_share(nearest_token_attack(activations[depth], ids, activations[depth]), ids) == 1.0


def test_an_update_that_holds_a_few_token_vectors_names_them():
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn(300, 32, generator=generator)
    present = torch.tensor([3, 17, 120, 299])
    rows = torch.randn(8, 4, generator=generator) @ dictionary[present]  # each row a mix of the present tokens
    named = update_attack(dictionary, rows, 4)
    assert set(named.tolist()) == set(present.tolist())
    assert 17 not in update_attack(dictionary, rows, 4, exclude=[17]).tolist()
    with pytest.raises(ValueError, match="zero"):
        update_attack(dictionary, torch.zeros(8, 32), 4)


def test_a_one_example_lora_update_of_the_first_block_leaks_most_of_its_tokens(encoder, tweets):
    model = _model(encoder, 0)
    special = encoder[1].all_special_ids
    dictionary = first_layer_dictionary(split_classifier(model))
    shares = []
    for index in range(4):
        example = tweets.subset([index])
        model.zero_grad()
        model(**trim_batch(example, torch.device("cpu"))).loss.backward()
        gradient = {name: (layer.lora_A[adapter_io.ADAPTER].weight.grad, None)
                    for name, layer in adapter_io.lora_layers(model).items()}
        rows = block_update_rows(gradient, 0)
        assert rows.shape == (2 * 4, dictionary.shape[1])  # query and value, rank 4
        _, ids, _ = cut_activations(split_classifier(model), example, [0], exclude=special)
        shares.append(named_share(update_attack(dictionary, rows, len(torch.unique(ids)), special), ids))
    assert sum(shares) / len(shares) > 0.5


def test_the_metrics_count_what_they_say():
    true = torch.tensor([5, 7, 7, 9])
    assert recovered_share(torch.tensor([5, 7, 1, 1]), true) == 0.5
    assert named_share(torch.tensor([7]), true) == 0.5  # two of four positions hold token 7
    assert named_share(torch.tensor([5, 7, 9]), true) == 1.0
    with pytest.raises(ValueError):
        recovered_share(torch.tensor([1]), true)
    with pytest.raises(ValueError, match="no LoRA layer"):
        block_update_rows({"encoder.layer.1.attention.self.query": (torch.zeros(2, 3), None)}, 0)


def test_a_split_client_pays_for_its_side_of_the_cut_only(federation):
    from fedlora_edu.efficiency.costs import client_costs
    from fedlora_edu.efficiency.split import client_modules, split_client_costs

    whole = client_costs(federation, make_strategy("FedIT"), rounds=1)
    costs = {cut: split_client_costs(federation, SplitLoRA(cut=cut), rounds=1) for cut in (1, 3)}
    head = split_client_costs(federation, make_strategy("SplitFedLoRA"), rounds=1)
    assert 0 < costs[1].flops < costs[3].flops < whole.flops  # the deeper the cut, the more the client computes
    assert head.flops < costs[1].flops / 100  # the head's arithmetic only
    assert 0 < costs[1].activation_bytes < costs[3].activation_bytes < whole.activation_bytes
    classifier = split_classifier(run_split.last_model)
    held = sum(p.numel() * p.element_size() for m in client_modules(classifier, SplitFederatedLoRA(), 0)
               for p in m.parameters())
    assert head.weight_bytes == held < whole.weight_bytes  # the embeddings and the head
    rank = federation.profile.rank
    assert costs[1].trainable_parameters == 2 * 2 * rank * classifier.config.hidden_size  # block 0's q and v
    assert head.bytes_up > whole.bytes_up  # the activations outweigh the adapter
    with pytest.raises(ValueError, match="sets clients_per_round"):
        split_client_costs(federation, SplitLoRA(cut=1), rounds=1, clients_per_round=2)
