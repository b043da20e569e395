"""The keys of ``/get_reward``'s ``extra_logs``: rmserve's own, and the rule that keeps a composite's
components and a head's objectives, logged under their own names, off them.

OpenRLHF logs each key as a metric of its own, so two values under one key would lose one silently; a name
that would take a reserved key is refused where it is declared (the composites file, the bundle).
"""

from __future__ import annotations

from collections.abc import Sequence

TOKENS = "rm_tokens"
TRUNCATED = "rm_truncated"
RETEMPLATED = "rm_retemplated"
UNRECOGNISED = "rm_unrecognised"
SKIPPED = "rm_skipped"  # a composite's components left out (on_error: skip)
STEPS = "rm_steps"
STEPS_DROPPED = "rm_steps_dropped"
STEP_MIN = "rm_step_min"
STEP_MEAN = "rm_step_mean"
STEP_LAST = "rm_step_last"
RESERVED: tuple[str, ...] = (
    TOKENS,
    TRUNCATED,
    RETEMPLATED,
    UNRECOGNISED,
    SKIPPED,
    STEPS,
    STEPS_DROPPED,
    STEP_MIN,
    STEP_MEAN,
    STEP_LAST,
)
# A composite's component ``x`` also logs its normalised value under ``x_normalized``.
NORMALIZED = "_normalized"


def normalized_key(name: str) -> str:
    return name + NORMALIZED


def reserved_clash(name: str, what: str) -> str | None:
    """Why ``name`` (a component's or an objective's: ``what``) cannot be an extra_logs key, or None."""
    if name in RESERVED:
        return (
            f"{what} {name!r} is a key reserved in /get_reward's extra_logs for rmserve's own values "
            f"({', '.join(RESERVED)}); give it another name"
        )
    return None


def normalized_clash(names: Sequence[str]) -> str | None:
    """Why a composite's component names would share an extra_logs key (``x_normalized`` beside ``x``), or
    None."""
    for name in names:
        if name.endswith(NORMALIZED) and name.removesuffix(NORMALIZED) in names:
            base = name.removesuffix(NORMALIZED)
            return (
                f"component {name!r} would take the extra_logs key of component {base!r}'s normalised value; "
                "give it another name"
            )
    return None
