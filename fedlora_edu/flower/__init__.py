"""Any registered method on Flower: the same strategy, run by Flower's ServerApp and ClientApp.

The simulator (:mod:`fedlora_edu.simulation.federation`) plays a federation inside one Python
process. This part runs the same :class:`~fedlora_edu.core.strategy.Strategy` on Flower (``flwr``,
its Message API), where the server and every client are separate processes that talk over the
network: an adapter, not a second implementation. The server calls the strategy's
``sample_clients``, ``client_start``, ``aggregate`` and the simulator's measurements; each client
runs the package's local training and the strategy's ``client_upload``; Flower only carries the
tensors (as Flower arrays) and the round's settings.

- :mod:`~fedlora_edu.flower.records`: tensors and payloads as Flower records, and back;
- :mod:`~fedlora_edu.flower.messaging`: what every run shares, its settings (``RunSettings``), its
  federation file, and the server's exchange of messages with the SuperNodes;
- :mod:`~fedlora_edu.flower.apps`: the round on the server (:func:`~fedlora_edu.flower.apps.serve`),
  one client's step (:func:`~fedlora_edu.flower.apps.client_step`), the ``ServerApp`` and
  ``ClientApp`` objects ``flwr run`` loads, and :func:`~fedlora_edu.flower.apps.write_app`, which
  writes the Flower App directory for a run;
- :mod:`~fedlora_edu.flower.split`: split learning's own loop as messages, two per local step (the
  cut's activations up, their gradient down; :func:`~fedlora_edu.flower.split.serve_split`, which
  the ``ServerApp`` calls for a split method, and the ClientApp's ``train.split_*`` actions);
- :mod:`~fedlora_edu.flower.inprocess`: a Grid whose SuperNodes live in the calling process, every
  message serialised to Flower's wire format (:func:`~fedlora_edu.flower.inprocess.run_in_process`:
  a run in seconds, for the tests and the chapter);
- :mod:`~fedlora_edu.flower.localhost`: Flower's deployment engine on one machine (a SuperLink and
  one SuperNode per client, each a separate process, the run submitted with ``flwr run``), stopped
  whatever happens.
- :mod:`~fedlora_edu.flower.simulation`: Flower's simulation engine (the same apps, with Ray actors
  as virtual SuperNodes, in one process; :func:`~fedlora_edu.flower.simulation.simulate`), Ray
  stopped whatever happens.

Flower is an optional extra: ``pip install fedlora-edu[flower]``. The rest of the package never
imports it, so Colab and the book stay light.
"""

try:
    import flwr  # noqa: F401  (fail here, with the install line, rather than deep inside an import)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("fedlora_edu.flower needs Flower, an optional extra: pip install fedlora-edu[flower]") \
        from error
