"""One client's local training and evaluation: the local update of survey eq. 3.

Everything a client does between download and upload, independent of any method: its
tokenised data (:class:`ClientData`), shuffled mini-batches (:class:`BatchSampler`), the
optimiser (AdamW), ``steps`` gradient steps on whatever parameters train
(:func:`local_train`) and the accuracy of a model on held-out data (:func:`evaluate`). The
federation loop (:mod:`fedlora_edu.simulation.federation`) calls them for every sampled
client, the batched engine reuses the sampler and optimiser, and methods whose server runs
a training phase of its own (SLoRA's sparse stage 1) call them directly.

Taught in ``book/part1/federated_learning.ipynb`` and ``book/part1/fedlora.ipynb``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.device import default_device


@dataclass
class ClientData:
    """Tokenised examples of one client (or of a test set): ids, mask and labels.

    ``hidden``, when set, is the output of the model's frozen bottom layers for every example
    (examples x tokens x hidden size), computed once: the model then runs only its adapted top
    layers on it (:class:`~fedlora_edu.assets.models.MeanPoolingClassifier`'s ``frozen_layers``).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    hidden: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | list[int]) -> ClientData:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        hidden = None if self.hidden is None else self.hidden[index]
        return ClientData(self.input_ids[index], self.attention_mask[index], self.labels[index], hidden)

    @staticmethod
    def concat(parts: list[ClientData]) -> ClientData:
        """The examples of several clients in one set (the pooled data of centralized training)."""
        if not parts:
            raise ValueError("parts is empty: nothing to concatenate")
        if len({part.hidden is None for part in parts}) != 1:
            raise ValueError("either every part carries cached hidden states or none does")
        hidden = None if parts[0].hidden is None else torch.cat([part.hidden for part in parts])
        return ClientData(*(torch.cat([getattr(part, name) for part in parts])
                            for name in ("input_ids", "attention_mask", "labels")), hidden)


def tokenize(texts: list[str], labels: list[int], tokenizer: object, max_length: int) -> ClientData:
    """Tokenise texts once, truncated and padded to ``max_length`` tokens."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
    return ClientData(encoded["input_ids"], encoded["attention_mask"], torch.as_tensor(list(labels)))


def trim_batch(batch: ClientData, device: torch.device) -> dict[str, Tensor]:
    """Move a batch to ``device``, cutting the columns that are padding in every row."""
    width = int(batch.attention_mask.sum(dim=1).max())
    trimmed = {
        "input_ids": batch.input_ids[:, :width].to(device),
        "attention_mask": batch.attention_mask[:, :width].to(device),
        "labels": batch.labels.to(device),
    }
    if batch.hidden is not None:
        trimmed["hidden_states"] = batch.hidden[:, :width].to(device)
    return trimmed


def set_trainable(model: nn.Module, trainable: frozenset[str]) -> None:
    """Freeze or unfreeze every layer's A and B as the strategy asks ({"A"}, {"B"} or both)."""
    unknown = set(trainable) - {"A", "B"}
    if unknown or not trainable:
        raise ValueError(f"trainable must be a non-empty subset of {{'A', 'B'}}, got {set(trainable)}")
    for layer in adapter_io.lora_layers(model).values():
        layer.lora_A[adapter_io.ADAPTER].weight.requires_grad_("A" in trainable)
        layer.lora_B[adapter_io.ADAPTER].weight.requires_grad_("B" in trainable)


class BatchSampler:
    """Shuffled mini-batches of one client's data, drawn without replacement epoch after epoch."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size == 0:
            raise ValueError("a client with no examples cannot train")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(size, generator=self.generator)
        self.position = 0

    def next(self) -> np.ndarray:
        if self.position + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return index.numpy()


def make_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW (no weight decay) over the parameters that train: LoRA factors and the head."""
    return adamw([p for p in model.parameters() if p.requires_grad], learning_rate)


def adamw(parameters: list[Tensor], learning_rate: float) -> torch.optim.Optimizer:
    """The clients' optimiser: AdamW with torch's defaults and no weight decay (shared with the engine)."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)


def local_train(
    model: nn.Module,
    data: ClientData,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    rank: int | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    sampler: BatchSampler | None = None,
) -> float:
    """``steps`` AdamW steps on the trainable LoRA factors and head; returns the mean loss.

    A fresh optimiser and batch order each call unless ``optimizer`` and ``sampler`` are
    passed (a client's optimiser state never leaves it; centralised training keeps
    both across calls). With ``rank`` below the model's rank, gradients of the padded
    components are zeroed, so a rank-r_k client trains exactly r_k components.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = default_device() if device is None else device
    optimizer = make_optimizer(model, learning_rate) if optimizer is None else optimizer
    if sampler is None:
        sampler = BatchSampler(len(data), batch_size, seed)
        torch.manual_seed(seed)  # dropout inside the model; a caller passing a sampler seeds it once
    layers = list(adapter_io.lora_layers(model).values())
    if rank is not None and rank >= adapter_io.model_rank(model):
        rank = None  # no padded components to hold at zero
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**trim_batch(data.subset(sampler.next()), device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if rank is not None:
            for layer in layers:
                a = layer.lora_A[adapter_io.ADAPTER].weight
                b = layer.lora_B[adapter_io.ADAPTER].weight
                if a.grad is not None:
                    a.grad[rank:] = 0
                if b.grad is not None:
                    b.grad[:, rank:] = 0
        optimizer.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(model: nn.Module, data: ClientData, *, batch_size: int = 64,
             device: torch.device | None = None) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data``.

    The examples are visited shortest first, so that each batch is cut to the length of its own
    longest example (:func:`trim_batch`) rather than to that of a random one: on the testbed's
    tweets this runs about 30% fewer token positions than batches in the stored order, for the
    same per-example predictions (padding is masked out). Accuracy and loss do not depend on the
    order; the loss is summed in another order, so it can differ in the last float bits.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = default_device() if device is None else device
    model.eval()
    correct, loss_sum = 0, 0.0
    order = torch.argsort(data.attention_mask.sum(dim=1), stable=True).tolist()
    for start in range(0, len(data), batch_size):
        batch = trim_batch(data.subset(order[start:start + batch_size]), device)
        output = model(**batch)
        loss_sum += float(output.loss) * batch["labels"].shape[0]
        correct += int((output.logits.argmax(dim=-1) == batch["labels"]).sum())
    return correct / len(data), loss_sum / len(data)
