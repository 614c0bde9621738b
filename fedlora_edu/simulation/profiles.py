"""One switch for cost: the profile that sizes every experiment in the book.

A chapter never hard-codes how many clients, rounds or tokens it uses: it asks
:func:`get_profile` and prints :func:`describe_environment` at the top. The same
notebook then runs in seconds in CI (``smoke``), in minutes on a laptop CPU
(``cpu``, the default without a GPU) and at real scale on a GPU (``gpu``, the
default when CUDA is available). Set the environment variable
``FEDLORA_PROFILE`` to override the choice.

Taught in the preface (``book/intro.md``).
"""

from __future__ import annotations

import importlib
import os
import platform
from dataclasses import asdict, dataclass, replace

import torch

from fedlora_edu.core.device import default_device

PROFILE_ENV_VAR = "FEDLORA_PROFILE"


@dataclass(frozen=True)
class Profile:
    """The size of every experiment: clients, rounds, local steps, tokens, rank.

    ``rank`` and ``lora_alpha`` are the LoRA hyper-parameters of survey eq. 2
    (scaling ``alpha / r``); ``num_clients`` is K of survey eq. 1 and
    ``clients_per_round`` the number sampled each communication round. ``adapted_layers``
    (None: all) is how many top transformer layers of the encoder LoRA adapts; the frozen layers
    below are computed once per example (:func:`~fedlora_edu.simulation.federation.build_federation`).
    """

    name: str
    num_clients: int
    clients_per_round: int
    rounds: int
    local_steps: int
    batch_size: int
    max_length: int
    train_examples: int
    test_examples: int
    rank: int
    lora_alpha: float
    learning_rate: float
    description: str
    adapted_layers: int | None = None

    def with_overrides(self, **changes: object) -> Profile:
        """Return a copy with some fields changed (for a chapter's ablation)."""
        unknown = set(changes) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown profile field(s) {sorted(unknown)}; valid: {sorted(asdict(self))}")
        return replace(self, **changes)  # type: ignore[arg-type]


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        num_clients=6,
        clients_per_round=3,
        rounds=3,
        local_steps=3,
        batch_size=8,
        max_length=24,
        train_examples=240,
        test_examples=60,
        rank=4,
        lora_alpha=8.0,
        learning_rate=1e-3,
        description="CI: seconds per chapter, checks that everything runs end to end",
    ),
    "cpu": Profile(
        name="cpu",
        num_clients=10,
        clients_per_round=4,
        rounds=5,
        local_steps=5,
        batch_size=16,
        max_length=32,
        train_examples=800,
        test_examples=200,
        rank=8,
        lora_alpha=16.0,
        learning_rate=1e-3,
        description="laptop CPU: at most a few minutes per chapter",
    ),
    "gpu": Profile(
        name="gpu",
        num_clients=100,
        clients_per_round=10,
        rounds=40,
        local_steps=20,
        batch_size=32,
        max_length=128,
        train_examples=1780,
        test_examples=445,
        rank=8,
        lora_alpha=16.0,
        learning_rate=1e-3,
        description="one T4 or H100: more clients, rounds and tokens",
    ),
}


def default_profile_name() -> str:
    """``FEDLORA_PROFILE`` if set, else ``gpu`` with CUDA and ``cpu`` without."""
    chosen = os.environ.get(PROFILE_ENV_VAR, "").strip()
    if chosen:
        return chosen
    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    """Return the named profile, or the default one (see :func:`default_profile_name`)."""
    chosen = default_profile_name() if name is None else name
    if chosen not in PROFILES:
        source = f"environment variable {PROFILE_ENV_VAR}" if name is None else "name"
        raise ValueError(f"unknown profile {chosen!r} (from {source}); choose one of {sorted(PROFILES)}")
    return PROFILES[chosen]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the chapters depend on ("not installed" for a missing one:
    a benchmark on a GPU machine without ``datasets`` still records its provenance)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "datasets"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def describe_environment(profile: Profile | None = None) -> str:
    """The line every chapter prints first: profile, device and library versions."""
    profile = get_profile() if profile is None else profile
    device = default_device()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return (
        f"profile: {profile.name} ({profile.description})\n"
        f"device: {device.type} ({device_name}), {torch.get_num_threads()} CPU threads\n"
        f"versions: {versions}"
    )


def provenance(profile: Profile | str | None = None) -> dict[str, object]:
    """Where and with what a measurement was taken: device, versions, profile, date, commit.

    Every benchmark under ``benchmarks/`` writes this next to its numbers, so a figure in the
    book or README can always be traced to the machine and code that produced it.
    """
    import datetime
    import subprocess

    if isinstance(profile, str) or profile is None:
        profile = get_profile(profile)
    device = default_device()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_model_name()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name,
        "device": device.type,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "commit": commit,
    }


def _cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
