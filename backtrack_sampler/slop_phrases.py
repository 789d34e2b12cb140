"""A small built-in list of phrases that small instruction models overuse in stories ("slop"),
for demos and quick starts: ``AntiSlopStrategy(provider, SLOP_PHRASES)``.

Written for this project (not taken from a third-party list). Matching is case-insensitive and
on text, so ``"embark"`` also catches "embarked". For serious use, load a larger list of your own.
"""

SLOP_PHRASES = (
    "a testament to", "tapestry", "barely above a whisper", "shivers down", "sent a shiver",
    "couldn't help but", "a mix of", "the air was thick with", "filled the air", "hung in the air",
    "eyes sparkling", "eyes sparkled", "eyes twinkling", "mischievous glint", "piercing blue eyes",
    "seemed to see right through", "whispered secrets", "whispers of", "echoed through", "in the heart of",
    "nestled", "bustling", "little did", "a glimmer of hope", "a sense of wonder", "a wave of",
    "the weight of", "heart pounding", "time stood still", "lost in thought", "embark", "realm",
    "humble abode", "delve", "palpable", "unwavering", "newfound", "ancient secrets", "forever changed",
    "the scent of", "a mixture of", "eyes lit up", "intently", "shimmering", "mysterious", "ethereal",
    "a hint of", "warm, golden",
)
