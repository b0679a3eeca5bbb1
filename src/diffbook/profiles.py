"""Run profiles: one switch between a seconds-long test run, the CPU book build and GPU-scale training.

- ``smoke``: what ``make test`` runs; the shipped checkpoints with small sample counts, well under a minute per
  chapter. Every quantitative claim of a chapter is asserted here too, with a tolerance that follows from the
  smaller sample (see :mod:`diffbook.checks`); the training loop itself is covered by the package tests.
- ``default``: what ``make book`` runs on a laptop CPU; the shipped checkpoints with the sample sizes the text
  quotes, minutes per chapter.
- ``full``: the paper's scale, trained from scratch; meant for a GPU.

A chapter's tagged ``parameters`` cell sets ``PROFILE = None``; :func:`current_profile` then reads
``$DIFFBOOK_PROFILE`` (default ``"default"``).
"""
from __future__ import annotations

import os
from typing import TypeVar

PROFILES = ("smoke", "default", "full")
T = TypeVar("T")


def current_profile(override: str | None = None) -> str:
    """``override`` if given, else ``$DIFFBOOK_PROFILE``, else ``"default"``; validated."""
    profile = override or os.environ.get("DIFFBOOK_PROFILE") or "default"
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: expected one of {', '.join(PROFILES)} "
                         "(set DIFFBOOK_PROFILE or the chapter's PROFILE parameter)")
    return profile


def by_profile(profile: str, *, smoke: T, default: T, full: T) -> T:
    """Pick the setting for ``profile``: ``by_profile(p, smoke=10, default=1000, full=100_000)``."""
    return {"smoke": smoke, "default": default, "full": full}[current_profile(profile)]
