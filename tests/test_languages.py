"""Clusters known in advance: FedLFC (one adapter per language family) and FedHLT (a language tree); the
multilingual federation they are made for (fedlora_edu.federations)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import TINY, recording

from fedlora_edu.core.factors import fedit_average
from fedlora_edu.core.strategy import normalized_weights, split_factors
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.federations import LANGUAGE_TREE, TASKS, build_multilingual, language_path, load_parlspeech
from fedlora_edu.heterogeneity.clustering import cluster_averages
from fedlora_edu.heterogeneity.languages import FedHLT, FedLFC


def _uploaded(uploads, names):
    out = []
    for upload in uploads:
        a, b = split_factors(upload.payload, names)
        out.append({n: (a[n], b[n]) for n in names})
    return out


def _close(x, y):
    return torch.allclose(x, y.to(x), atol=1e-6)


def test_fedlfc_serves_each_group_the_average_of_its_uploads(shards_federation):
    groups = ["x", "y", "x"]
    strategy = recording(FedLFC)(groups)
    history = shards_federation.run(strategy, rounds=2, progress=False, evaluate_clients=True)
    names = list(shards_federation.last_server.adapters)
    uploads = strategy.rounds[0][1]
    uploaded = _uploaded(uploads, names)
    weights = normalized_weights(uploads)
    labels = [0 if groups[u.client_id] == "x" else 1 for u in uploads]
    averages = cluster_averages(uploaded, weights, labels)
    for upload, label in zip(uploads, labels, strict=True):
        start = strategy.starts[1][upload.client_id]  # round 2 starts from the group's adapter
        for n in names:
            assert _close(start.adapters[n][0], averages[label][n][0])
            assert _close(start.adapters[n][1], averages[label][n][1])
    server = shards_federation.last_server
    # every client of a group is served the same adapter, the groups differ
    personal = [strategy.personal_model(server, k, None)[0] for k in range(3)]
    assert all(torch.equal(personal[0][n][0], personal[2][n][0]) for n in names)
    assert not all(torch.equal(personal[0][n][0], personal[1][n][0]) for n in names)
    # the server's own adapter is FedIT's average of the round's uploads
    last = strategy.rounds[-1][1]
    fedit = {n: fedit_average([u[n][0] for u in _uploaded(last, names)], [u[n][1] for u in _uploaded(last, names)],
                              normalized_weights(last)) for n in names}
    assert all(_close(server.adapters[n][0], fedit[n][0]) and _close(server.adapters[n][1], fedit[n][1])
               for n in names)
    assert history["client_accuracy"].notna().all()


def test_fedlfc_with_one_group_is_fedit(shards_federation):
    columns = ["accuracy", "client_accuracy", "bytes_up", "bytes_down", "train_loss"]
    one = shards_federation.run(FedLFC(["all"] * 3), rounds=2, progress=False, seed=1, evaluate_clients=True)
    fedit = shards_federation.run(FedIT(), rounds=2, progress=False, seed=1, evaluate_clients=True)
    pd.testing.assert_frame_equal(one[columns], fedit[columns])


def test_fedhlt_nodes_average_the_uploads_below_them_and_clients_mix_their_path(shards_federation):
    paths = [("root", "G", "en"), ("root", "G", "de"), ("root", "R", "es")]
    strategy = recording(FedHLT)(paths)
    shards_federation.run(strategy, rounds=1, progress=False)
    server = shards_federation.last_server
    names = list(server.adapters)
    uploads = strategy.rounds[0][1]
    uploaded = _uploaded(uploads, names)
    weights = normalized_weights(uploads)
    nodes = server.method_state.adapters
    assert set(nodes) == {"root", "G", "R", "en", "de", "es"}
    for node in nodes:
        below = [i for i, u in enumerate(uploads) if node in paths[u.client_id]]
        mass = sum(weights[i] for i in below)
        expected = fedit_average([uploaded[i][names[0]][0] for i in below], [uploaded[i][names[0]][1] for i in below],
                                 [weights[i] / mass for i in below])
        assert _close(nodes[node][names[0]][0], expected[0]) and _close(nodes[node][names[0]][1], expected[1])
    # a client is served the equal-weight mean of its path's nodes, A and B each
    for k, path in enumerate(paths):
        served, _ = strategy.personal_model(server, k, None)
        for n in names:
            mean_a = sum(nodes[node][n][0] for node in path) / len(path)
            mean_b = sum(nodes[node][n][1] for node in path) / len(path)
            assert _close(served[n][0], mean_a) and _close(served[n][1], mean_b)
    assert all(_close(server.adapters[n][0], nodes["root"][n][0]) for n in names)


def test_settings_are_checked(shards_federation):
    with pytest.raises(ValueError, match="groups is empty"):
        FedLFC([])
    with pytest.raises(ValueError, match="same root"):
        FedHLT([("a", "x"), ("b", "y")])
    with pytest.raises(ValueError, match="two parents"):
        FedHLT([("root", "G", "en"), ("root", "R", "en")])
    with pytest.raises(ValueError, match="groups names 2 clients, the federation has 3"):
        shards_federation.run(FedLFC(["x", "y"]), rounds=1, progress=False)
    with pytest.raises(ValueError, match="FedHLT needs each client's group: pass groups="):
        shards_federation.run(FedHLT(), rounds=1, progress=False)


def test_language_tree_and_paths():
    assert language_path("de") == ("root", "Germanic", "de") and language_path("es") == ("root", "Romance", "es")
    assert sorted(lang for langs in LANGUAGE_TREE.values() for lang in langs) == ["de", "en", "es", "nl"]
    with pytest.raises(ValueError, match="not in the language tree"):
        language_path("fr")


def test_parlspeech_tasks_hold_both_labels_in_every_language():
    for task, labels in TASKS.items():
        speeches = load_parlspeech(task=task)
        assert set(speeches["language"]) == {"en", "de", "es", "nl"}
        counts = speeches.groupby(["language", "label"]).size().unstack()
        assert counts.shape == (4, len(labels)) and (counts > 10).all().all(), counts
        assert (speeches["text"].str.len() > 0).all()
    chair = load_parlspeech(task="chair")
    assert (chair["label"] == chair["chair"].astype(int)).all()
    with pytest.raises(ValueError, match="task must be one of"):
        load_parlspeech(task="topic")
    with pytest.raises(ValueError, match="languages must be"):
        load_parlspeech(("fr",))


def test_multilingual_federation_gives_each_client_one_language_and_a_shared_test_of_all():
    profile = TINY.with_overrides(train_examples=80, test_examples=24)
    federation = build_multilingual(profile=profile, clients_per_language=2, seed=0)
    assert federation.num_clients == 8 and federation.client_languages == ["en", "en", "de", "de", "es", "es",
                                                                           "nl", "nl"]
    speeches = federation.speeches
    test_languages = speeches[speeches["client"] == -1]["language"].value_counts()
    assert (test_languages == 6).all() and len(test_languages) == 4 and len(federation.test) == 24
    for k, language in enumerate(federation.client_languages):
        assert set(speeches[speeches["client"] == k]["language"]) == {language}
        assert len(federation.clients[k]) + len(federation.client_tests[k]) == (speeches["client"] == k).sum()
        assert len(federation.client_tests[k]) >= 1
    assert federation.label_names == ["member", "chair"] and not federation.train_head
    assert federation.client_families == [language_path(lang)[1] for lang in federation.client_languages]
    for strategy in (FedLFC(), FedHLT()):  # without groups, both read them from the federation
        history = federation.run(strategy, rounds=1, progress=False, evaluate_clients=True)
        assert history["client_accuracy"].notna().all()
    assert strategy.paths == [language_path(lang) for lang in federation.client_languages]
    with pytest.raises(ValueError, match="clients_per_language must be an integer >= 1"):
        build_multilingual(profile=profile, clients_per_language=0)


def test_rank_budgets_draw_light_and_heavy_tails():
    import numpy as np

    from fedlora_edu.federations import rank_budgets

    light = rank_budgets("light-tailed", 2000, np.random.default_rng(0))
    heavy = rank_budgets("heavy-tailed", 2000, np.random.default_rng(0))
    assert min(light) == 4 and max(light) == 8
    assert min(heavy) == 1 and max(heavy) <= 8
    counts = np.bincount(heavy, minlength=9)[1:]
    expected = (1.0 / np.arange(1, 9) ** 2) / (1.0 / np.arange(1, 9) ** 2).sum()
    assert np.abs(counts / len(heavy) - expected).max() < 0.03  # P(r) ~ r^-2
    heavier = rank_budgets("heavy-tailed", 2000, np.random.default_rng(0), exponent=1.0)
    assert np.mean(heavier) > np.mean(heavy)
    # the same draws as a generator used directly (what the heterogeneous-ranks chapter drew before)
    rng = np.random.default_rng(5)
    assert rank_budgets("light-tailed", 10, np.random.default_rng(5)) == rng.integers(4, 9, size=10).tolist()
    with pytest.raises(ValueError, match="tail must be one of"):
        rank_budgets("medium", 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        rank_budgets("light-tailed", 0, np.random.default_rng(0))


def test_memory_budgets_draw_light_and_heavy_tails_below_the_largest():
    import numpy as np

    from fedlora_edu.federations import memory_budgets

    largest = 10**9
    light = np.array(memory_budgets("light-tailed", 4000, np.random.default_rng(0), largest=largest))
    assert light.min() >= largest // 2 and light.max() <= largest
    for exponent in (0.5, 1.0, 3.0):
        heavy = np.array(memory_budgets("heavy-tailed", 4000, np.random.default_rng(1), largest=largest,
                                        exponent=exponent))
        assert heavy.min() >= 1 and heavy.max() <= largest
        for share in (0.1, 0.5):  # P(budget <= share * largest) = share^exponent
            assert abs(np.mean(heavy <= share * largest) - share ** exponent) < 0.03
    thin = memory_budgets("heavy-tailed", 4000, np.random.default_rng(1), largest=largest, exponent=0.5)
    assert abs(np.median(thin) / largest - 0.25) < 0.03  # P(budget <= largest / 4) = (1/4)^(1/2): half the clients
    assert np.median(thin) < np.median(light) / 2
    assert memory_budgets("heavy-tailed", 5, np.random.default_rng(2), largest=largest) == \
        memory_budgets("heavy-tailed", 5, np.random.default_rng(2), largest=largest)
    for bad, match in (({"tail": "medium"}, "tail must be one of"), ({"count": 0}, "count must be"),
                       ({"largest": 0}, "largest must be"), ({"exponent": 0.0}, "exponent must be > 0")):
        arguments = {"tail": "heavy-tailed", "count": 3, "largest": largest, "exponent": 1.0, **bad}
        tail, count = arguments.pop("tail"), arguments.pop("count")
        with pytest.raises(ValueError, match=match):
            memory_budgets(tail, count, np.random.default_rng(0), **arguments)


def test_multitask_federation_gives_each_client_one_task_in_a_joint_label_space():
    from fedlora_edu.distributed.discordance import FedIT
    from fedlora_edu.federations import MULTITASK_TASKS, build_multitask, load_multitask

    table, names = load_multitask()
    assert len(names) == 5 + 3 + 16 and names[0].startswith("topics: ") and names[-1].startswith("outlet: ")
    for offset, task in ((0, "topics"), (5, "sentiment"), (8, "outlet")):  # each task's labels in its own block
        labels = table[table["task"] == task]["label"]
        assert labels.min() == offset and labels.max() == offset + {"topics": 4, "sentiment": 2, "outlet": 15}[task]
    profile = TINY.with_overrides(train_examples=72, test_examples=24)
    federation = build_multitask(profile=profile, clients_per_task=2, seed=0)
    assert federation.client_tasks == ["topics", "topics", "sentiment", "sentiment", "outlet", "outlet"]
    assert federation.tasks == tuple(MULTITASK_TASKS) and federation.label_names == names
    examples = federation.examples
    assert (examples[examples["client"] == -1]["task"].value_counts() == 8).all() and len(federation.test) == 24
    for k, task in enumerate(federation.client_tasks):
        assert set(examples[examples["client"] == k]["task"]) == {task}
        assert len(federation.clients[k]) + len(federation.client_tests[k]) == (examples["client"] == k).sum()
    history = federation.run(FedIT(), rounds=1, progress=False, evaluate_clients=True)
    assert history["client_accuracy"].notna().all()
    with pytest.raises(ValueError, match="tasks must be distinct"):
        load_multitask(("topics", "topics"))
    with pytest.raises(ValueError, match="clients_per_task"):
        build_multitask(profile=profile, clients_per_task=0)
