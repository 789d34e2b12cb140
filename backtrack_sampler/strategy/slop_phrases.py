"""A small built-in list of phrases that small instruction models overuse in stories ("slop"),
for demos and quick starts: ``AntiSlopStrategy(provider, SLOP_PHRASES)``.

Written for this project (not taken from a third-party list). Matching is case-insensitive and
on text, so ``"embark"`` also catches "embarked" (``" etched"`` starts with a space so that
"stretched" is not caught). For serious use, load a larger list of your own.

The last two lines were added from SmolLM2 135M Instruct's own stories (issue 17): the phrases it wrote most
often that read as stock story prose. With them, 30 of 30 of its plain stories for the demo's
request (temperature 0.8, min_p 0.05, 300 tokens, seeds 0-29) hold at least one phrase of the list
(17 of 30 before), and 19 of 24 on 12 other story requests (temperature 1, seeds 0-1; 12 before).
"""

SLOP_PHRASES = (
    "a testament to",
    "tapestry",
    "barely above a whisper",
    "shivers down",
    "sent a shiver",
    "couldn't help but",
    "a mix of",
    "the air was thick with",
    "filled the air",
    "hung in the air",
    "eyes sparkling",
    "eyes sparkled",
    "eyes twinkling",
    "mischievous glint",
    "piercing blue eyes",
    "seemed to see right through",
    "whispered secrets",
    "whispers of",
    "echoed through",
    "in the heart of",
    "nestled",
    "bustling",
    "little did",
    "a glimmer of hope",
    "a sense of wonder",
    "a wave of",
    "the weight of",
    "heart pounding",
    "time stood still",
    "lost in thought",
    "embark",
    "realm",
    "humble abode",
    "delve",
    "palpable",
    "unwavering",
    "newfound",
    "ancient secrets",
    "forever changed",
    "the scent of",
    "a mixture of",
    "eyes lit up",
    "intently",
    "shimmering",
    "mysterious",
    "ethereal",
    "a hint of",
    "warm, golden",
    "a lone",
    "weathered",
    "crumbling",
    " etched",
    "the horizon",
    "stormy night",
    "vast expanse",
    "flickering",
    "once upon a time",
    "grizzled",
    "a beacon of",
)
