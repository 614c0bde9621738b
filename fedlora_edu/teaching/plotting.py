"""Figures shared by the chapters: one colour per method in every chapter.

Taught alongside every chapter; the colours follow ``METHOD_COLORS``.
"""

from __future__ import annotations

import pandas as pd

METHOD_COLORS: dict[str, str] = {
    "centralized": "#000000",
    "FedIT": "#d62728",
    "FFA-LoRA": "#1f77b4",
    "FLoRA": "#2ca02c",
    "FlexLoRA": "#9467bd",
    "FedEx-LoRA": "#ff7f0e",
    "full FedAvg": "#7f7f7f",
    # Part II, single-matrix and full-size aggregation
    "CoLR": "#17becf",
    "RoLoRA": "#8c564b",
    "LoRA-A2": "#e377c2",
    "FedPipe": "#bcbd22",
    # Part II, corrective and rank clustering
    "LoRA-FAIR": "#ffbb78",
    "FedInc": "#98df8a",
    # Part II, initialisation (Avg-Initial is FedIT's behaviour and shares its colour)
    "standard init": "#d62728",
    "SLoRA": "#aec7e8",
    "FeDeRA": "#c5b0d5",
    "Avg-Initial": "#d62728",
    "Re-Initial": "#c49c94",
    "Local-Initial": "#f7b6d2",
    "FedLoRU": "#393b79",
    "pFedLoRU": "#637939",
    "mFedLoRU": "#8c6d31",
    "FRLoRA": "#843c39",
    # Part III, heterogeneous ranks and personalized LoRA
    "HetLoRA": "#5254a3",
    "replication padding": "#9c9ede",
    "FedSA-LoRA": "#7b4173",
    "CE-LoRA": "#a55194",
    "pFedLoRA": "#bd9e39",
    "FedDPA": "#ce6dbd",
    "FDLoRA": "#e7969c",
    "PerFIT": "#de9ed6",
    "FL-TAC": "#31a354",
    "FedLFC": "#74c476",
    "FedHLT": "#006d2c",
    "HyperFloRA": "#e6550d",
    # Part IV, sparse learning
    "FLASC": "#756bb1",
    "FSLoRA": "#636363",
    "HAFL": "#9e9ac8",
    # Part IV, layer level, compression, privacy
    "FibecFed": "#3182bd",
    "Fed-piLot": "#e6ab02",
    "FedFMSL": "#1b9e77",
    "FedRA": "#d95f02",
    "SplitFedLoRA": "#b15928",
    "SplitLoRA": "#6a3d9a",
    "Quantized": "#66a61e",
    "Top-k": "#a6761d",
    "CG-FedLLM": "#7570b3",
    "FedBiOT": "#e7298a",
    "FwdLLM": "#666666",
    "DP-FedAvg": "#fb9a99",
}

METRIC_LABELS: dict[str, str] = {
    "accuracy": "test accuracy (fraction correct)",
    "test_loss": "test loss (cross-entropy, nats)",
    "train_loss": "local training loss (cross-entropy, nats)",
    "discordance": "discordance ||avg(B)avg(A) - sum p_k B_k A_k||_F (scaled)",
    "aggregation_error": "aggregation error ||W_global - sum p_k W_k||_F",
    "bytes_up": "bytes uploaded per round",
    "bytes_down": "bytes downloaded per round",
    "client_accuracy": "mean accuracy on clients' own data",
}


def method_color(method: str) -> str | None:
    """The colour of ``method`` (the part before any " (" suffix), or None for matplotlib's default."""
    return METHOD_COLORS.get(method.split(" (")[0])


def plot_rounds(history: pd.DataFrame, metric: str = "accuracy", ax=None, **plot_options):
    """One line per method of ``metric`` against the communication round; returns the Axes."""
    import matplotlib.pyplot as plt

    if metric not in history.columns:
        raise ValueError(f"metric {metric!r} is not a column of the history; columns: {list(history.columns)}")
    ax = plt.subplots(figsize=(6, 3.5))[1] if ax is None else ax
    for method, rows in history.groupby("method", sort=False):
        ax.plot(rows["round"], rows[metric], marker="o", label=method, color=method_color(str(method)),
                **plot_options)
    ax.set_xlabel("communication round")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax
