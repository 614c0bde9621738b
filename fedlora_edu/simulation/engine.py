"""Train all sampled clients of a round at once: LoRA adapters batched over a client dimension.

The sequential loop of :meth:`fedlora_edu.simulation.federation.Federation.run` swaps client k's
adapter into one peft model, runs its local steps, copies the adapter out and moves on
to client k + 1. Every client then pays its own Python overhead and its own small
matrix products. This engine runs local step s of *all* K sampled clients in one forward
and one backward pass over the shared frozen base model:

- every adapted layer keeps the K clients' factors stacked, A as a (K, r_max, n) tensor
  and B as (K, m, r_max) (survey eq. 2 per client: W_k = W' + (alpha / r) B_k A_k), and
  the task head likewise, (K, ...) per head parameter;
- the K clients' mini-batches are concatenated along the batch dimension (client k's rows
  are block k), padded to a common batch size and width; padded columns are masked by the
  attention mask and padded rows carry zero weight in the loss;
- each peft LoRA layer computes ``base_layer(x) + scaling * bmm(bmm(x_k, A_k^T), B_k^T)``
  with x reshaped to (K, b * L, n) (:func:`batched_lora_forward`), so the frozen W' is
  applied to all rows in one large product and every client's rows meet only its own
  factors;
- the loss is the SUM over clients of each client's own mean cross-entropy: the gradient
  of the sum with respect to client k's factors is exactly client k's sequential gradient,
  because nothing else in the graph couples clients' rows (attention and layer norm act
  within one sequence);
- one AdamW over the stacked tensors is K independent AdamWs: every AdamW operation is
  elementwise, all clients take the same number of steps, and nothing couples clients
  (no gradient clipping over the stack, no weight decay).

Heterogeneous ranks (FLoRA, FlexLoRA with ``ranks``) are zero-padded to r_max and the
gradients of the padded components are zeroed, as :func:`~fedlora_edu.foundations.training.local_train`
does with ``rank``. A matrix a client does not train this round (``ClientStart.trainable``:
FFA-LoRA freezes A, RoLoRA-style schedules alternate) gets a zero gradient slice: AdamW's
moments stay zero and the slice stays bit-identical. A matrix no sampled client trains is
left out of the optimiser altogether.

Equivalence. With dropout off (the model's ``hidden_dropout_prob`` and
``attention_probs_dropout_prob`` and LoRA's dropout all 0) the engine's adapters and heads
equal the sequential loop's to float tolerance (same per-client batches: each client
draws them from ``BatchSampler(len(data), batch_size, derive_seed(seed, "client batches", t, k))`` as
the sequential loop does; only the summation order of the larger products differs). With
dropout on, the engine draws its dropout masks from one stream for the whole round, so its
masks are equal in distribution to the sequential loop's but not the same draws, and runs
differ from the sequential ones by the randomness of dropout (each is reproducible with
its seed).

This is simulation machinery, not a method of the survey (arXiv 2505.13502): it changes how
fast the simulator computes survey eq. 3's local updates, not what they are. The idea of
serving many LoRA adapters over one base model with batched products is the one of
multi-adapter serving systems (S-LoRA, Sheng et al. 2023, arXiv 2311.03285; Punica, Chen et
al. 2023, arXiv 2310.18547); here it is used for training. Taught in
``book/fast/engine.ipynb`` (chapter "Simulating a federation fast").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.strategy import ClientStart, LocalResult
from fedlora_edu.foundations.training import BatchSampler, ClientData, adamw

MATRICES = frozenset({"A", "B"})


@dataclass
class ClientJob:
    """One client's local work in a round: its id, data, start (adapter, head, trainable) and batch seed."""

    client_id: int
    data: ClientData
    start: ClientStart
    seed: int


# ----------------------------------------------------------------------------------------
# The batched products: the core of the engine
# ----------------------------------------------------------------------------------------
def batched_lora_forward(base_layer: nn.Module, dropout: nn.Module, x: Tensor, A: Tensor, B: Tensor,
                         scaling: float) -> Tensor:
    """W' x + scaling * B_k A_k x for every client k at once (survey eq. 2, one client per block of rows).

    ``x`` is (K * b, L, n) with client k's rows in block k; ``A`` is (K, r, n) and ``B``
    (K, m, r). The frozen ``base_layer`` sees all rows in one product; the low-rank path
    is two batched products over the client dimension.
    """
    result = base_layer(x)
    clients = A.shape[0]
    x_k = dropout(x).to(A.dtype).reshape(clients, -1, x.shape[-1])  # (K, b * L, n)
    delta = torch.bmm(torch.bmm(x_k, A.transpose(1, 2)), B.transpose(1, 2))  # (K, b * L, m)
    return result + scaling * delta.reshape(result.shape).to(result.dtype)


def batched_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Client k's own linear head on its block of rows: x_k W_k^T + b_k; ``weight`` is (K, out, in)."""
    clients = weight.shape[0]
    x_k = x.reshape(clients, -1, x.shape[-1])
    out = torch.bmm(x_k, weight.transpose(1, 2))
    if bias is not None:
        out = out + bias[:, None, :]
    return out.reshape(*x.shape[:-1], weight.shape[1])


@contextlib.contextmanager
def routed(model: nn.Module, factors: dict[str, tuple[Tensor, Tensor]],
           heads: dict[str, tuple[Tensor, Tensor | None]]) -> Iterator[None]:
    """Within the block, every LoRA layer and head of ``model`` uses the stacked per-client tensors.

    The layers' own forward is shadowed by an instance attribute and restored on exit
    (even on error), so the model is unchanged afterwards.
    """
    layers = adapter_io.lora_layers(model)
    patched: list[nn.Module] = []
    try:
        for name, (A, B) in factors.items():
            layer = layers[name]
            dropout = layer.lora_dropout[adapter_io.ADAPTER]
            scaling = float(layer.scaling[adapter_io.ADAPTER])
            layer.forward = _bind_lora(layer.base_layer, dropout, A, B, scaling)
            patched.append(layer)
        for module_name, (weight, bias) in heads.items():
            module = model.get_submodule(module_name)
            module.forward = _bind_head(weight, bias)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def _bind_lora(base_layer, dropout, A, B, scaling):
    def forward(x, *args, **kwargs):
        return batched_lora_forward(base_layer, dropout, x, A, B, scaling)
    return forward


def _bind_head(weight, bias):
    def forward(x):
        return batched_linear(x, weight, bias)
    return forward


# ----------------------------------------------------------------------------------------
# Which models the engine can run
# ----------------------------------------------------------------------------------------
def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that own the head's parameters (by module name)."""
    names = {name.rsplit(".", 1)[0] for name in adapter_io.head_parameters(model)}
    return {name: model.get_submodule(name) for name in sorted(names)}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the engine cannot train ``model`` (None when it can).

    It needs plain peft LoRA on ``nn.Linear`` layers (no DoRA or other variant, no LoRA
    bias, no fan-in/fan-out transposition, one adapter) and a trainable head, if any, made of
    ``nn.Linear`` modules whose parameters are weight and bias (a frozen head is part of W').
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    try:
        layers = adapter_io.lora_layers(model)
    except ValueError as error:
        return str(error)
    for name, layer in layers.items():
        if not isinstance(layer, LoraLinear) or not isinstance(layer.base_layer, nn.Linear):
            return f"layer {name} is not a LoRA-wrapped nn.Linear"
        if list(layer.lora_A) != [adapter_io.ADAPTER] or layer.active_adapters != [adapter_io.ADAPTER]:
            return f"layer {name} has adapters {list(layer.lora_A)}; the engine runs exactly one"
        if adapter_io.ADAPTER in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter_io.ADAPTER):
            return f"layer {name} uses a LoRA variant (e.g. DoRA)"
        if layer.fan_in_fan_out or layer.merged or layer.disable_adapters:
            return f"layer {name} is transposed, merged or disabled"
        if layer.lora_B[adapter_io.ADAPTER].bias is not None:
            return f"layer {name} has a LoRA bias"
    for name, module in head_modules(model).items():  # none when the head is frozen (part of W')
        if type(module) is not nn.Linear:
            return f"head module {name} is {type(module).__name__}, not nn.Linear"
    return None


# ----------------------------------------------------------------------------------------
# One round of local training for K clients
# ----------------------------------------------------------------------------------------
def _check_trainable(trainable: frozenset[str], client_id: int) -> None:
    if not trainable or set(trainable) - MATRICES:
        raise ValueError(f"client {client_id}: trainable must be a non-empty subset of {{'A', 'B'}}, "
                         f"got {set(trainable)}")


def _stack_factors(jobs: Sequence[ClientJob], layers: dict[str, nn.Module], device: torch.device):
    """Per layer, (K, r_max, n) and (K, m, r_max) tensors holding each client's start, zero-padded."""
    stacked = {}
    for name, layer in layers.items():
        a_param = layer.lora_A[adapter_io.ADAPTER].weight
        b_param = layer.lora_B[adapter_io.ADAPTER].weight
        r_max, n = a_param.shape
        m = b_param.shape[0]
        A = torch.zeros(len(jobs), r_max, n, dtype=a_param.dtype, device=device)
        B = torch.zeros(len(jobs), m, r_max, dtype=b_param.dtype, device=device)
        for k, job in enumerate(jobs):
            if name not in job.start.adapters:
                raise ValueError(f"client {job.client_id}: start adapters have no layer {name!r}")
            a, b = job.start.adapters[name]
            r = a.shape[0]
            if a.shape != (r, n) or b.shape != (m, r) or r > r_max:
                raise ValueError(f"client {job.client_id}, layer {name}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                                 f"do not fit a layer with A ({r_max}, {n}) (r x n) and B ({m}, {r_max}) (m x r)")
            A[k, :r] = a.to(device)
            B[k, :, :r] = b.to(device)
        stacked[name] = (A, B)
    return stacked


def _step_batch(jobs, samplers, device):
    """This step's batch of every client, concatenated, as keyword arguments of the model (ids and mask
    (K * b_max, width), cached hidden states where the data carries them), with the labels, row weights and b_max."""
    picks = [sampler.next() for sampler in samplers]
    b_max = max(len(p) for p in picks)
    ids, masks, labels, weights, hidden = [], [], [], [], []
    cached = {job.data.hidden is not None for job in jobs}
    if len(cached) != 1:
        raise ValueError("either every client's data carries cached hidden states or none does")
    for job, pick in zip(jobs, picks, strict=True):
        rows = np.concatenate([pick, np.full(b_max - len(pick), pick[0], dtype=pick.dtype)])
        index = torch.as_tensor(rows, dtype=torch.int64)
        ids.append(job.data.input_ids[index])
        masks.append(job.data.attention_mask[index])
        labels.append(job.data.labels[index])
        if job.data.hidden is not None:
            hidden.append(job.data.hidden[index])
        weight = torch.zeros(b_max)
        weight[:len(pick)] = 1.0 / len(pick)  # client k's mean over its real rows; padded rows weigh 0
        weights.append(weight)
    length = max(t.shape[1] for t in ids)
    ids = torch.cat([F.pad(t, (0, length - t.shape[1])) for t in ids])
    masks = torch.cat([F.pad(t, (0, length - t.shape[1])) for t in masks])
    width = int(masks.sum(dim=1).max())  # cut the columns that are padding in every row
    inputs = {"input_ids": ids[:, :width].to(device), "attention_mask": masks[:, :width].to(device)}
    if hidden:
        inputs["hidden_states"] = torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in hidden])[:, :width]
        inputs["hidden_states"] = inputs["hidden_states"].to(device)
    return inputs, torch.cat(labels).to(device), torch.stack(weights).to(device), b_max


def train_clients_batched(
    model: nn.Module,
    jobs: Sequence[ClientJob],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device | None = None,
    dropout_seed: int = 0,
) -> list[LocalResult]:
    """``steps`` AdamW steps of every client in ``jobs`` at once; one :class:`LocalResult` per job, in order.

    Equivalent to running :func:`fedlora_edu.foundations.training.local_train` for each client in turn
    on ``model`` with its start adapter, head and ``trainable`` (see the module docstring
    for the exact sense, and for dropout). ``model``'s own parameters are not changed;
    the stacked tensors live only during the call. ``dropout_seed`` seeds torch's global
    generator once for the dropout masks of the whole round.
    """
    if not jobs:
        raise ValueError("jobs is empty: nothing to train")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"model cannot be trained by the batched engine: {reason}")
    device = next(model.parameters()).device if device is None else device
    head_params = adapter_io.head_parameters(model)
    for job in jobs:
        _check_trainable(job.start.trainable, job.client_id)
        if set(job.start.head) != set(head_params):
            raise ValueError(f"client {job.client_id}: start head keys {sorted(job.start.head)} do not match the "
                             f"model's head parameters {sorted(head_params)}")
    layers = adapter_io.lora_layers(model)
    clients = len(jobs)
    ranks = [next(iter(job.start.adapters.values()))[0].shape[0] for job in jobs]

    factors = _stack_factors(jobs, layers, device)
    heads: dict[str, tuple[Tensor, Tensor | None]] = {}
    head_stacks: dict[str, Tensor] = {}
    for module_name, module in head_modules(model).items():
        stacks = []
        for attribute in ("weight", "bias"):
            full = f"{module_name}.{attribute}"
            if getattr(module, attribute) is None:
                stacks.append(None)
                continue
            stack = torch.stack([job.start.head[full].to(device) for job in jobs]).detach().requires_grad_(True)
            head_stacks[full] = stack
            stacks.append(stack)
        heads[module_name] = (stacks[0], stacks[1])
    if set(head_stacks) != set(head_params):
        raise ValueError(f"head parameters {sorted(head_params)} are not the weight and bias of linear modules")

    # Gradient masks: client k's padded rank components and the matrices it does not train.
    r_max = adapter_io.model_rank(model)
    component = torch.arange(r_max, device=device)[None, :] < torch.tensor(ranks, device=device)[:, None]  # (K, r)
    keep = {side: torch.tensor([side in job.start.trainable for job in jobs], device=device) for side in MATRICES}
    masks = {"A": (component & keep["A"][:, None])[:, :, None], "B": (component & keep["B"][:, None])[:, None, :]}
    trained = {side: bool(keep[side].any()) for side in MATRICES}
    parameters = list(head_stacks.values())
    for A, B in factors.values():
        for side, tensor in (("A", A), ("B", B)):
            if trained[side]:
                tensor.requires_grad_(True)
                parameters.append(tensor)
    optimizer = adamw(parameters, learning_rate)  # the sequential loop's optimiser, over the stacks

    samplers = [BatchSampler(len(job.data), batch_size, job.seed) for job in jobs]
    torch.manual_seed(dropout_seed)
    losses = torch.zeros(steps, clients, device=device)  # kept on the device: no sync per step
    model.train()
    with routed(model, factors, heads):
        for step in range(steps):
            inputs, labels, row_weights, b_max = _step_batch(jobs, samplers, device)
            logits = model(**inputs).logits
            per_row = F.cross_entropy(logits.float(), labels, reduction="none").reshape(clients, b_max)
            per_client = (per_row * row_weights).sum(dim=1)  # each client's own mean loss
            optimizer.zero_grad(set_to_none=True)
            per_client.sum().backward()  # d(sum)/d(theta_k) = d(loss_k)/d(theta_k): clients do not interact
            with torch.no_grad():
                for A, B in factors.values():
                    if A.grad is not None:
                        A.grad.masked_fill_(~masks["A"], 0.0)
                    if B.grad is not None:
                        B.grad.masked_fill_(~masks["B"], 0.0)
            optimizer.step()
            losses[step] = per_client.detach()

    mean_losses = losses.mean(dim=0).tolist()
    results = []
    for k, job in enumerate(jobs):
        r = ranks[k]
        adapters = {name: (A[k, :r].detach().clone(), B[k, :, :r].detach().clone()) for name, (A, B) in factors.items()}
        head = {name: head_stacks[name][k].detach().clone() for name in head_params}
        results.append(LocalResult(job.client_id, adapters, head, len(job.data), mean_losses[k], r))
    return results


def check_clients_per_pass(clients_per_pass: object) -> int | None:
    """Validate ``clients_per_pass``: None (all sampled clients in one pass) or an integer >= 1."""
    if clients_per_pass is None:
        return None
    if isinstance(clients_per_pass, bool) or not isinstance(clients_per_pass, int) or clients_per_pass < 1:
        raise ValueError(f"clients_per_pass must be None (all clients in one pass) or an integer >= 1, "
                         f"got {clients_per_pass!r}")
    return clients_per_pass


def train_clients_in_groups(
    model: nn.Module,
    jobs: Sequence[ClientJob],
    *,
    clients_per_pass: int | None = None,
    dropout_seed: int = 0,
    **training: object,
) -> tuple[list[LocalResult], int]:
    """:func:`train_clients_batched` over groups of at most ``clients_per_pass`` clients, one group after another.

    Returns the results of all ``jobs`` in order and the group size that ran. The stacked
    activations of a pass grow with the number of clients in it, so a round of many sampled
    clients may not fit the device in one pass. With ``clients_per_pass`` given, the round
    is split into groups of that size. With ``None`` it first tries all clients in one pass
    and, each time the device runs out of memory (``torch.OutOfMemoryError``, what CUDA
    raises), halves the group and tries again; the smaller size holds for the rest of the
    round. Nothing of a failed pass is kept: every group starts from its clients' starts.

    Clients do not interact (see the module docstring), so with dropout off the grouping
    changes no result beyond float tolerance; with dropout on, group g draws its masks from
    ``dropout_seed + `` its first client's position, so the first group's draws are those of
    an ungrouped round. ``training`` are :func:`train_clients_batched`'s keyword arguments.
    """
    if not jobs:
        raise ValueError("jobs is empty: nothing to train")
    size = len(jobs) if check_clients_per_pass(clients_per_pass) is None else min(clients_per_pass, len(jobs))
    results: list[LocalResult] = []
    first = 0
    while first < len(jobs):
        group = jobs[first:first + size]
        try:
            results.extend(train_clients_batched(model, group, dropout_seed=dropout_seed + first, **training))
        except torch.OutOfMemoryError:
            if clients_per_pass is not None or size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = (size + 1) // 2
            continue
        first += len(group)
    return results, size


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability of ``model`` to 0 (in place; returns it).

    The engine equals the sequential loop to float tolerance only without dropout (see the
    module docstring): the equivalence tests and the chapter build their model with this.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if config is not None and getattr(config, key, None) is not None:
            setattr(config, key, 0.0)
    return model
