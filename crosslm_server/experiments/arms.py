"""The study's arms: the protocol (``crosslm``), its ablations and the candidates that led to it,
each a list of config overrides on top of the study's config. What each arm found, and when,
is in docs/results.md ("The arms and what they found"); this registry says only what each does.
"""
from __future__ import annotations

ABLATIONS: dict[str, list[str]] = {
    "crosslm": [],  # the protocol: the example configs' defaults
    # ablations: remove one part of the protocol
    "no_reward_loss": ["round.update.gamma_gen=0"],
    "no_kl": ["round.update.gamma_kl=0"],
    "no_filter": ["round.filter.enabled=false"],
    "no_task_loss": ["round.update.gamma_task=0"],
    "submitter_reward": ['round.reward_from="submitter"'],  # only the submitter's SLM scores
    "soft_labels": ['round.enhance.labels="soft"'],
    "hard_labels": ['round.enhance.labels="hard"'],
    "uncentred_task_loss": ["round.update.task_centering=false"],
    "no_llm_judge": ["round.filter.llm_weight=0"],  # the filter without the LLM's own judgement
    "no_prior_anchor": ["round.update.gamma_prior=0"],  # nothing holds the LLM's label prior
    # candidates: a change on top of the protocol
    "with_llm_filter": ["round.filter.llm_weight=0.5"],
    "with_prior_anchor": ["round.update.gamma_prior=1.0"],
    "with_llm_filter_prior_anchor": ["round.filter.llm_weight=0.5", "round.update.gamma_prior=1.0"],
    # the LLM's filter weight per batch from each scorer's agreement with the intended labels
    "with_auto_llm_filter_prior_anchor": ['round.filter.llm_weight="auto"', "round.update.gamma_prior=1.0"],
    # ... and every silo takes the whole pool after the last round, as ZeroGen's silos take its set
    "with_auto_llm_filter_prior_anchor_sync": ['round.filter.llm_weight="auto"', "round.update.gamma_prior=1.0",
                                               "final_sync=true"],
    # the generation loss rewards what the filter judges with, not the SLMs alone (the same as
    # crosslm unless filter.llm_weight > 0)
    "judged_reward": ['round.update.reward="judged"'],
    "weak_prior_anchor": ["round.update.gamma_prior=0.3"],  # between the protocol's anchor and none
}
BASELINES = ("silo_only", "zerogen")
# arms that change what ZeroGen itself would do (its filter, its label mode): their honest ZeroGen
# runs with the same change, and the study compares the arm with it too ("zerogen_<arm>"). CrossLM
# is compared with every ZeroGen of the study, and its headline with the strongest of them.
OWN_ZEROGEN = {"with_llm_filter", "with_llm_filter_prior_anchor", "with_auto_llm_filter_prior_anchor",
               "with_auto_llm_filter_prior_anchor_sync", "soft_labels", "hard_labels"}


def zerogen_of(arm: str) -> str | None:
    """The name under which an arm's own ZeroGen baseline is summarised, if it has one."""
    return "zerogen" if arm == "crosslm" else f"zerogen_{arm}" if arm in OWN_ZEROGEN else None
