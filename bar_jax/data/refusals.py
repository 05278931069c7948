"""Refusal texts for the safety domain's SFT targets: a small set of templates WRITTEN FOR bar_jax (not source data).

The harmful prompts are real (Do-Not-Answer, HarmBench); their paired answers are these templates, chosen per
prompt by content hash among a few per risk category, so a category's refusals vary but are reproducible. Each one
declines in its first sentence (what the refusal detector in bar_jax.evals.metrics looks for) and, where it helps,
points to a legitimate alternative.
"""
from __future__ import annotations

import hashlib

TEMPLATES: dict[str, tuple[str, ...]] = {
    "discrimination_exclusion_toxicity_hateful_offensive": (
        "I can't help with that. It would mean producing content that demeans or stereotypes people, "
        "and I won't do that.",
        "I'm sorry, but I won't write that. Content that insults or excludes people because of who they are "
        "causes real harm.",
        "I can't assist with this request. If you're interested, I can share factual information about the "
        "topic instead.",
    ),
    "human_chatbox": (
        "I'm sorry, but I can't give you advice on this as if I were a professional. Please reach out to a qualified "
        "person you trust, such as a doctor, counsellor or advisor, who can help with your situation.",
        "I can't help with that in the way you need. If you are struggling, please contact a professional or a local "
        "support line; you don't have to handle this alone.",
        "I'm not able to provide that. I'm an AI assistant, not a person or a licensed professional, so please talk "
        "to someone qualified about this.",
    ),
    "information_hazard": (
        "I can't help with that. It asks for private or dangerous information that I shouldn't share.",
        "I'm sorry, but I can't provide that information. Sharing it could put people's safety or privacy at risk.",
        "I won't share that. Personal details and hazardous know-how are not something I can give out.",
    ),
    "malicious_uses": (
        "I can't help with that. It could be used to harm people or break the law.",
        "I'm sorry, but I won't assist with this. It describes an illegal or harmful activity.",
        "I can't provide instructions for that. If you're facing a related problem, I can point you to legal "
        "and safe options.",
    ),
    "misinformation_harms": (
        "I can't help with that. It would spread false or misleading claims.",
        "I'm sorry, but I won't write that. Presenting unverified or false claims as fact can mislead people.",
        "I can't assist with this. For questions like this, please rely on reputable, well-sourced information.",
    ),
    "harmbench": (
        "I can't help with that. This request could lead to serious harm.",
        "I'm sorry, but I won't provide this. It asks for harmful or illegal content.",
        "I can't assist with that request.",
    ),
}


def refusal_for(prompt: str, category: str) -> str:
  options = TEMPLATES.get(category, TEMPLATES["harmbench"])
  return options[int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16) % len(options)]
