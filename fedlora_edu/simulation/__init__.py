"""Running a federation on one machine: the federation loop, the batched engine, the profiles.

- :mod:`.federation`: :class:`~.federation.Federation` plays rounds of any strategy
  (survey eq. 3) and :func:`~.federation.build_federation` builds one in one call;
- :mod:`.engine`: all sampled clients of a round trained at once;
- :mod:`.profiles`: the one switch that sizes every experiment.

Imports :mod:`fedlora_edu.core`, :mod:`fedlora_edu.foundations` and :mod:`fedlora_edu.assets`,
never a method: the loop only sees the :class:`~fedlora_edu.core.strategy.Strategy` interface.
"""
