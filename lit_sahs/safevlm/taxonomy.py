"""Risk levels and risk types of the safety head, and how a sample gets them.

SafeVLM's head predicts a *risk level* (safe / low / medium / high) and a *risk type* (seven
types, "safe" included). The product's sources carry their own categories; this module is the one
place that maps them:

* benign samples (any attack template around them) are ``safe`` / ``safe``;
* AdvBench's harm categories (pyrit's seed file) and Do-Not-Answer's risk areas map to a type by
  the table ``CATEGORY_TYPES``;
* HarmBench, past-tense and future-tense requests carry no category: a keyword rule over the text
  (``KEYWORD_TYPES``, first match wins) picks the type, else ``malicious_use``;
* no source gives a severity, so the level follows the type (``TYPE_LEVELS``): requests for
  physical harm, cyber attacks or financial crime are ``high`` (the guard refuses them outright),
  hate, discrimination and privacy harms are ``medium``, misinformation and manipulation ``low``
  (both get a safety hint instead). A user file may give ``risk_level`` / ``risk_type`` in a row's
  meta to override both.
"""
from __future__ import annotations

import re
from typing import Optional

from lit_sahs.data.samples import Sample
from lit_sahs.errors import LitSahsError

RISK_LEVELS: tuple[str, ...] = ("safe", "low", "medium", "high")
RISK_TYPES: tuple[str, ...] = ("safe", "physical_harm", "malicious_use", "financial_crime", "hate_discrimination",
                               "privacy", "misinformation_manipulation")

TYPE_LEVELS: dict[str, str] = {
    "safe": "safe",
    "physical_harm": "high",
    "malicious_use": "high",
    "financial_crime": "high",
    "hate_discrimination": "medium",
    "privacy": "medium",
    "misinformation_manipulation": "low",
}

CATEGORY_TYPES: dict[str, str] = {
    # AdvBench (pyrit seed file harm_categories)
    "Financial and Business": "financial_crime",
    "Physical": "physical_harm",
    "Environmental": "physical_harm",
    "Autonomy": "privacy",
    "Human Rights and Civil Liberties": "hate_discrimination",
    "Societal and Cultural": "hate_discrimination",
    "Psychological": "misinformation_manipulation",
    "Political and Economic": "misinformation_manipulation",
    "Reputational": "misinformation_manipulation",
    # Do-Not-Answer risk areas
    "information_hazard": "privacy",
    "malicious_uses": "malicious_use",
    "discrimination_exclusion_toxicity_hateful_offensive": "hate_discrimination",
    "misinformation_harms": "misinformation_manipulation",
    "human_chatbox": "misinformation_manipulation",
}

KEYWORD_TYPES: tuple[tuple[str, re.Pattern], ...] = tuple((t, re.compile(p, re.I)) for t, p in (
    ("malicious_use", r"\b(hack\w*|malware|ransomware|virus|exploit\w*|phishing|ddos|botnet|keylog\w*|"
                      r"sql injection|password\w*|cyber\w*|backdoor)\b"),
    ("physical_harm", r"\b(bomb\w*|explosive\w*|weapon\w*|gun\w*|kill\w*|murder\w*|poison\w*|suicide|"
                      r"self-harm|violence|violent|attack\w*|assault\w*|chemical|biological|nerve agent|"
                      r"meth\w*|drug\w*|fentanyl|shoot\w*|terror\w*)\b"),
    ("financial_crime", r"\b(fraud\w*|scam\w*|launder\w*|counterfeit\w*|steal\w*|theft|embezzl\w*|"
                        r"insider trading|tax evasion|money|credit card\w*|bank\w*)\b"),
    ("hate_discrimination", r"\b(racis\w*|sexis\w*|hate|hateful|slur\w*|discriminat\w*|inferior|"
                            r"harass\w*|bully\w*|nazi\w*|holocaust)\b"),
    ("privacy", r"\b(personal information|private|privacy|dox\w*|track\w*|spy\w*|stalk\w*|surveil\w*|"
                r"address of|social security)\b"),
    ("misinformation_manipulation", r"\b(fake news|misinformation|disinformation|propaganda|conspiracy|"
                                    r"manipulat\w*|persuad\w*|convinc\w*|defamat\w*|hoax)\b"),
))
FALLBACK_TYPE = "malicious_use"


def type_of(sample: Sample) -> str:
    """The risk type of a sample (see the module docstring for the rules)."""
    if int(sample.label) == 0:
        return "safe"
    given = (sample.meta or {}).get("risk_type")
    if given is not None:
        return check_name(str(given), RISK_TYPES, "risk type")
    if sample.category in CATEGORY_TYPES:
        return CATEGORY_TYPES[sample.category]
    for name, pattern in KEYWORD_TYPES:
        if pattern.search(sample.text):
            return name
    return FALLBACK_TYPE


def level_of(sample: Sample, risk_type: Optional[str] = None) -> str:
    if int(sample.label) == 0:
        return "safe"
    given = (sample.meta or {}).get("risk_level")
    if given is not None:
        level = check_name(str(given), RISK_LEVELS, "risk level")
        if level == "safe":
            raise LitSahsError(f"sample {sample.id} is labelled malicious but its risk_level is 'safe'")
        return level
    return TYPE_LEVELS[risk_type or type_of(sample)]


def labels_of(sample: Sample) -> tuple[int, int]:
    """(level index, type index) for the safety head's two classifiers."""
    t = type_of(sample)
    return RISK_LEVELS.index(level_of(sample, t)), RISK_TYPES.index(t)


def check_name(name: str, known: tuple[str, ...], what: str) -> str:
    if name not in known:
        raise LitSahsError(f"unknown {what} {name!r}: the safety head was built for {', '.join(known)}")
    return name
