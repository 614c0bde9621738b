"""fedlora_edu: the companion package of the executable textbook on federated LoRA.

The package is laid out as the taxonomy of the survey *Federated Low-Rank Adaptation for
Foundation Models* (arXiv 2505.13502), and its imports point one way, from the bottom up:

- :mod:`~fedlora_edu.core`: the factor math of eqs. 1 and 4, input checks, SVD routes, seeds,
  the :class:`~fedlora_edu.core.strategy.Strategy` interface, peft factors as tensors;
- :mod:`~fedlora_edu.assets`: the embedded data and models;
- :mod:`~fedlora_edu.foundations`: section 2 (FedAvg, LoRA from scratch, partitions, one
  client's local training);
- :mod:`~fedlora_edu.distributed`, :mod:`~fedlora_edu.heterogeneity`,
  :mod:`~fedlora_edu.efficiency`: the methods of sections 3, 4 and 5, one module per leaf;
- :mod:`~fedlora_edu.registry`: every method by name (the only importer of the methods);
- :mod:`~fedlora_edu.simulation`: the federation loop, the batched engine, the profiles
  (it uses the core and the foundations, never a method);
- :mod:`~fedlora_edu.teaching`: exercise checks, figures, source on the page.

This module is the front door for chapters and users::

    from fedlora_edu import build_federation, get_profile, make_strategy

    federation = build_federation("bbc_news", scheme="dirichlet", alpha=0.5)
    history = federation.run(make_strategy("FedIT"))
"""

from fedlora_edu.core.device import default_device
from fedlora_edu.registry import METHODS, make_strategy, method_map
from fedlora_edu.simulation.federation import Federation, build_federation
from fedlora_edu.simulation.profiles import describe_environment, get_profile
from fedlora_edu.teaching.prose import report
from fedlora_edu.teaching.source import show_source
from fedlora_edu.testbed import build_testbed, centralized_learning_rate, testbed_profile

__version__ = "0.1.0"

__all__ = [
    "METHODS", "Federation", "build_federation", "default_device", "describe_environment", "get_profile",
    "build_testbed", "centralized_learning_rate", "make_strategy", "method_map", "report", "show_source",
    "testbed_profile",
]
