"""Stream a short story from the embedded Gemma 3 270M with the CreativeWriting strategy.

    .venv/bin/python examples/story.py ["Your story opening..."] [max_new_tokens]
"""

import sys

from backtrack_sampler import BacktrackSampler, CreativeWritingStrategy
from backtrack_sampler.models import load_llamacpp
from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider

opening = (
    "The lighthouse keeper had not seen a ship in eleven years. On the night of the storm, "
    "a small wooden boat washed onto the rocks below the tower, and inside it"
)
prompt = sys.argv[1] if len(sys.argv) > 1 else opening
max_new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 300

provider = LlamacppProvider(load_llamacpp(), None, "cpu")
strategy = CreativeWritingStrategy(provider, top_p_flat=0.65, top_k_threshold_flat=9, eos_penalty=0.75)
sampler = BacktrackSampler(provider, strategy)

print(prompt, end="", flush=True)
for text in sampler.generate_text(prompt, max_new_tokens=max_new_tokens, temperature=1):
    print(text, end="", flush=True)
stats = sampler.stats
print(
    f"\n\n[{stats.delivered} tokens delivered, {stats.rewound} rewound in {stats.rewinds} rewinds, "
    f"{stats.tokens_per_second:.1f} tokens/s]"
)
