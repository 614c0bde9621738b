"""LoRA aggregation discordance (survey section 3.1, eq. 4): FedIT, the baseline every branch improves on.

FedIT (Zhang et al. 2024, "Towards building the federated GPT: federated instruction
tuning") runs FedAvg on the two LoRA factors separately: the server averages the clients'
A_k and, independently, their B_k. The product of the averages is not the average of the
products (eq. 4),

    avg(B) avg(A)  !=  sum_k p_k B_k A_k ,

and the gap is the aggregation discordance. The math of both sides lives in
:mod:`fedlora_edu.core.factors` (:func:`~fedlora_edu.core.factors.fedit_average`,
:func:`~fedlora_edu.core.factors.ideal_update`, :func:`~fedlora_edu.core.factors.discordance`),
because the simulator measures the discordance of every method's clients; this module holds
the strategy. The other leaves of section 3.1 remove the gap: :mod:`.single_matrix`
(eq. 5), :mod:`.full_size` (eq. 6), :mod:`.corrective` (eq. 7), :mod:`.rank_clustering` (eq. 8).

Taught in ``book/part2/aggregation_discordance.ipynb``.
"""

from __future__ import annotations

from fedlora_edu.core.factors import fedit_average
from fedlora_edu.core.strategy import ServerState, Strategy, Upload, collect_factors


class FedIT(Strategy):
    """FedIT (Zhang et al. 2024, "Towards building the federated GPT"): FedAvg on A and B separately.

    Its aggregate is the left side of survey eq. 4, so it carries the discordance.
    """

    name = "FedIT"
    paper = "Zhang et al. 2024, ICASSP, arXiv 2305.05644"
    chapter = "book/part2/aggregation_discordance"

    def aggregate(self, server: ServerState, uploads: list[Upload], round_index: int) -> None:
        weights, per_layer = collect_factors(server, uploads)
        server.adapters = {n: fedit_average(a_list, b_list, weights) for n, (a_list, b_list) in per_layer.items()}
        self.aggregate_head(server, uploads)
