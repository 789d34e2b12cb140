"""no_digits.py: a sampling strategy of my own."""

import numpy as np

from backtrack_sampler import BaseStrategy


class NoDigits(BaseStrategy):
    """Never writes a digit: every token with a digit in it gets a logit of -inf.

    max_bans: how many times it may overrule the model's first choice; then digits pass."""

    edits_logits = True  # it changes the logits ...
    reads_probs = False  # ... and never reads the probability array (the fast path)

    def __init__(self, provider, max_bans: int = 100):
        self.max_bans = max_bans
        vocab = range(provider.vocab_size)
        self.digits = np.array([t for t in vocab if any(c.isdigit() for c in provider.decode([t]))], dtype=np.intp)
        self.reset()

    def reset(self):  # called before every generation
        self.bans = 0

    def on_logits(self, logits, continuation_tokens):
        if self.bans < self.max_bans:
            if np.argmax(logits) in self.digits:
                self.bans += 1
            logits[self.digits] = -np.inf
        return logits
